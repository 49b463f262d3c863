process TIFF_TO_N5 {
    tag "${meta.id}"
    label 'process_medium'

    // Resources and image from the pipeline's params (the host's tiff2n5_cpus/_memory), as a value:
    // the host never reads this project's conf/; a config's withName/withLabel setting still wins.
    cpus { (resources.cpus ?: 4) as Integer }
    memory { (resources.memory ?: '8 GB') as String }
    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: ((resources.container as String) ?: 'ghcr.io/janeliascicomp/exllsm-create-volume:0.2.0')}"
    // The TIFFs are read in place; the output container may not exist yet, so its parent is bound.
    containerOptions "${bindMounts(workflow.containerEngine, [file(tiff_dir), file(out_n5).parent])}"

    input:
    tuple val(meta), val(tiff_dir), val(out_n5), val(out_ds)
    // tiff_to_n5.py flags from the pipeline: --input_name_pattern, --chunks, --subvol, --compression, --overwrite
    val options
    // [ cpus: int, memory: '8 GB', container: image ('' = the pinned one) ]
    val resources

    output:
    tuple val(meta), val(out_n5), val(out_ds), emit: volume
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('tiff_to_n5.py --version | cut -d " " -f 3'), topic: versions, emit: versions_tiff_to_n5

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    // Chunks in flight (up to 2.5x their raw size each while encoded) get 60% of the task's memory (>= 1 GB)
    def memory_gb = Math.max(10L, Math.round((task.memory ? task.memory.toMega() : 2500L) * 0.006d)) / 10.0d
    """
    export EXLLSM_OVERWRITE_HINT='the pipeline param overwrite_output replaces it'
    tiff_to_n5.py \\
        --input ${tiff_dir} \\
        --output ${out_n5} --data_set ${out_ds} \\
        --io-threads ${task.cpus} --memory-gb ${memory_gb} ${options} ${args}
    """

    stub:
    """
    echo "stub: ${tiff_dir} -> ${out_n5}:${out_ds} (${options}) not converted"
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
