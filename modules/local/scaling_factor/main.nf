process SCALING_FACTOR {
    tag "${meta.id}:${meta.job.index}"
    label 'process_single'

    // Resources and image from the pipeline's params (the host's neuron_scaling_cpus/_memory and
    // exm_neuron_segmentation_container), as a value: the host never reads this project's conf/.
    cpus { (resources.cpus ?: 1) as Integer }
    memory { (resources.memory ?: '4 GB') as String }
    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: ((resources.container as String) ?: 'ghcr.io/janeliascicomp/exllsm-scaling-factor:0.2.0')}"
    // The input N5 is read in place (and the plots directory written in place): bind them.
    containerOptions "${bindMounts(workflow.containerEngine, [n5, plots_dir])}"

    input:
    tuple val(meta), val(n5), val(dataset), val(start), val(end), val(fraction)
    val partition_size
    val plots_dir
    // [ cpus: int, memory: '4 GB', container: image ('' = the pinned one) ]
    val resources

    output:
    // The host pipeline's contract: field 6 of "Calculated a scaling factor of <X> based on <n>/<N> tiles"
    tuple val(meta), eval("grep -o 'Calculated a scaling factor of [^ ]* based on' scaling.log | tail -n 1 | cut -d ' ' -f 6"), emit: scaling
    tuple val(meta), path('scaling.log'), emit: log
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('scaling_factor.py --version | cut -d " " -f 3'), topic: versions, emit: versions_scaling_factor

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def plots_arg = plots_dir ? "--scaling_plots_dir ${plots_dir}" : ''
    """
    scaling_factor.py \\
        --input ${n5} --data_set ${dataset} \\
        --percent_tiles ${fraction} --partition_size ${partition_size} \\
        --start ${start} --end ${end} --seed ${meta.job.index} ${plots_arg} ${args} > scaling.log
    """

    stub:
    """
    echo "Calculated a scaling factor of null based on 0/0 tiles" > scaling.log
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
