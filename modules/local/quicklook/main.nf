process QUICKLOOK {
    tag "${meta.id}"
    label 'process_low'

    // Resources and image as a value from the pipeline (the host never reads this project's conf/).
    cpus { (resources.cpus ?: 2) as Integer }
    memory { (resources.memory ?: '4 GB') as String }
    // A picture that cannot be made must not stop a run that segmented its volumes: the failed task
    // is reported, and nothing downstream waits for it.
    errorStrategy 'ignore'
    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: ((resources.container as String) ?: 'ghcr.io/janeliascicomp/exllsm-scaling-factor:0.2.0')}"
    // Both containers are read in place: bind them.
    containerOptions "${bindMounts(workflow.containerEngine, [in_n5, result_n5])}"

    input:
    // result_n5/result_ds: the dataset to overlay ('' = the input alone); kind: auto, probability, mask or labels
    tuple val(meta), val(in_n5), val(in_ds), val(result_n5), val(result_ds), val(kind)
    // [ cpus: int, memory: '4 GB', container: image ('' = the pinned one) ]
    val resources

    output:
    tuple val(meta), path('*.png'), emit: picture
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('quicklook.py --version | cut -d " " -f 3'), topic: versions, emit: versions_quicklook

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def overlay = result_n5 ? "--result ${result_n5}:${result_ds}" : ''
    """
    quicklook.py \\
        --input ${in_n5} --input_data_set ${in_ds} ${overlay} --kind ${kind ?: 'auto'} \\
        --output ${prefix}.png --io-threads ${task.cpus} --no-progress ${args}
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}.png
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
