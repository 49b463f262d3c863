process SEGMENT_VOLUME {
    tag "${meta.id}:${meta.block.index}"
    label 'process_medium'
    label 'process_gpu'
    label 'withGPU'

    // Resources and image from the pipeline's params (the host's neuron_segmentation_cpus/_memory and
    // exm_neuron_segmentation_container): the host never reads this project's conf/, so they come
    // in as a value; a config's withName/withLabel setting still wins, as Nextflow always lets it.
    cpus { (resources.cpus ?: 1) as Integer }
    memory { (resources.memory ?: '8 GB') as String }
    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: ((resources.container as String) ?: 'ghcr.io/janeliascicomp/exllsm-segment-volume:0.1.0')}"
    // N5 containers are written in place, so they travel as absolute paths and are bound into
    // the container here; the model is a staged file and Nextflow binds it itself.
    containerOptions "${bindMounts(workflow.containerEngine, [in_n5, out_n5])}"

    input:
    tuple val(meta), val(in_n5), val(in_ds), val(out_n5), val(out_ds), val(start), val(end), val(scaling)
    path model
    val options
    // [ cpus: int, memory: '24 GB', container: image ('' = the pinned one) ]
    val resources

    output:
    tuple val(meta), val(in_n5), val(in_ds), val(out_n5), val(out_ds), val(start), val(end), emit: block
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('segment_volume.py --version | cut -d " " -f 3'), topic: versions, emit: versions_segment_volume

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def scaling_arg = scaling ? "--scaling ${scaling}" : ''
    def io_threads = Math.max(task.cpus as int, 2)  // chunk reads and writes overlap the model: at least 2
    """
    segment_volume.py \\
        --input ${in_n5} --input_data_set ${in_ds} \\
        --output ${out_n5} --output_data_set ${out_ds} \\
        --model_path ${model} \\
        --start ${start} --end ${end} ${scaling_arg} \\
        --io-threads ${io_threads} --no-progress ${options} ${args}
    """

    stub:
    """
    echo "stub: block ${start}..${end} of ${out_n5}:${out_ds} not segmented"
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
