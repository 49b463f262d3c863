process LABEL_BLOCKS {
    tag "${meta.id}:blocks ${meta.task.range}"
    label 'process_single'

    // Resources and image as a value from the pipeline (the host never reads this project's conf/);
    // a config's withName/withLabel setting still wins. The image is the scaling-factor stage's: it has
    // SciPy and the N5 stack and no TensorFlow, and carries label_blocks.py, merge_labels.py and write_labels.py.
    cpus { (resources.cpus ?: 1) as Integer }
    memory { (resources.memory ?: '4 GB') as String }
    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: ((resources.container as String) ?: 'ghcr.io/janeliascicomp/exllsm-scaling-factor:0.2.0')}"
    // The input N5 is read in place and the records folder written in place (created by the script, so
    // its parent, which must exist, is bound); an earlier pass's records (--restrict) are read in place.
    containerOptions "${bindMounts(workflow.containerEngine, [in_n5, parentOf(records), restrict])}"

    input:
    // restrict: records folder of an earlier, merged pass of the same volume whose kept objects
    // restrict the foreground ('' for none): per volume, so it travels with the volume
    // blocks: the task's blocks, consecutive in the plan: [ [start: 'x0,y0,z0', end: 'x1,y1,z1'], ... ]
    tuple val(meta), val(in_n5), val(in_ds), val(records), val(restrict), val(blocks)
    // label_blocks.py flags of the pass: --threshold, --connectivity, --seed-threshold
    val options
    // [ cpus: int, memory: '4 GB', container: image ('' = the pinned one) ]
    val resources

    output:
    tuple val(meta), val(in_n5), val(in_ds), val(records), val(restrict), val(blocks), emit: blocks
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('label_blocks.py --version | cut -d " " -f 3'), topic: versions, emit: versions_label_blocks

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def restrict_arg = restrict ? "--restrict ${restrict}" : ''
    // one record per block, each written whole or not at all: a retried task simply writes them again
    def block_args = blocks.collect { block -> "--start ${block.start} --end ${block.end}" }.join(' \\\n        ')
    def io_threads = Math.max(task.cpus as int, 2)
    """
    label_blocks.py \\
        --input ${in_n5} --input_data_set ${in_ds} \\
        --records ${records} \\
        ${block_args} ${restrict_arg} \\
        --io-threads ${io_threads} ${options} ${args}
    """

    stub:
    def boxes = blocks.collect { block -> "${block.start}..${block.end}" }.join(' ')
    """
    echo "stub: blocks ${boxes} of ${in_n5}:${in_ds} not labelled into ${records}"
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}

// The folder a path lies in ('' for none): bound for a folder the script creates.
def parentOf(path) {
    return path ? "${file("${path}").parent}" : ''
}
