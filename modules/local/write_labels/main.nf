process WRITE_LABELS {
    tag "${meta.id}:blocks ${meta.task.range}"
    label 'process_single'

    // Resources and image as a value from the pipeline (the host never reads this project's conf/);
    // a config's withName/withLabel setting still wins. The image is the scaling-factor stage's: SciPy
    // and the N5 stack, no TensorFlow, and the components scripts.
    cpus { (resources.cpus ?: 1) as Integer }
    memory { (resources.memory ?: '4 GB') as String }
    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: ((resources.container as String) ?: 'ghcr.io/janeliascicomp/exllsm-scaling-factor:0.2.0')}"
    // N5 containers and the merged records folders are read and written in place: bind them.
    containerOptions "${bindMounts(workflow.containerEngine, [in_n5, out_n5] + records)}"

    input:
    // records, always a list: [ dir ] of one merged pass (uint64 labels), or [ hysteresis_dir, size_dir ]
    // of the two merged post-processing passes (float32 probabilities, or uint8 masks); blocks: [ [start:, end:], ... ] of the plan
    tuple val(meta), val(in_n5), val(in_ds), val(out_n5), val(out_ds), val(records), val(blocks)
    // write_labels.py flags, e.g. --redo
    val options
    // [ cpus: int, memory: '4 GB', container: image ('' = the pinned one) ]
    val resources

    output:
    tuple val(meta), val(in_n5), val(in_ds), val(out_n5), val(out_ds), val(blocks), emit: blocks
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('write_labels.py --version | cut -d " " -f 3'), topic: versions, emit: versions_write_labels

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def source = records.size() == 2 ? "--post-processing ${records[0]} ${records[1]}" : "--records ${records[0]}"
    // each block gets a done marker: a retried task skips the blocks it finished
    def block_args = blocks.collect { block -> "--start ${block.start} --end ${block.end}" }.join(' \\\n        ')
    def io_threads = Math.max(task.cpus as int, 2)
    """
    write_labels.py \\
        --input ${in_n5} --input_data_set ${in_ds} \\
        --output ${out_n5} --output_data_set ${out_ds} \\
        ${source} \\
        ${block_args} \\
        --io-threads ${io_threads} ${options} ${args}
    """

    stub:
    def boxes = blocks.collect { block -> "${block.start}..${block.end}" }.join(' ')
    """
    echo "stub: blocks ${boxes} of ${out_n5}:${out_ds} not written"
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
