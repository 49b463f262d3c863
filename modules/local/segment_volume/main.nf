process SEGMENT_VOLUME {
    tag "${meta.id}:blocks ${meta.task.range}"
    label 'process_medium'
    label 'process_gpu'
    label 'withGPU'

    // Resources and image from the pipeline's params (the host's neuron_segmentation_cpus/_memory and
    // exm_neuron_segmentation_container): the host never reads this project's conf/, so they come
    // in as a value; a config's withName/withLabel setting still wins, as Nextflow always lets it.
    cpus { (resources.cpus ?: 1) as Integer }
    memory { (resources.memory ?: '8 GB') as String }
    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: ((resources.container as String) ?: 'ghcr.io/janeliascicomp/exllsm-segment-volume:0.2.0')}"
    // N5 containers (and the mask's) are read and written in place, so they travel as absolute
    // paths and are bound into the container here; the model is a staged file and Nextflow binds it itself.
    containerOptions "${bindMounts(workflow.containerEngine, [in_n5, out_n5, maskContainer(mask)])}"

    input:
    // blocks: the task's blocks, consecutive in the plan: [ [start: 'x0,y0,z0', end: 'x1,y1,z1'], ... ]
    tuple val(meta), val(in_n5), val(in_ds), val(out_n5), val(out_ds), val(blocks), val(scaling)
    path model
    val options
    // 'container:dataset' tissue mask (absolute container path), '' for none
    val mask
    // [ cpus: int, memory: '24 GB', container: image ('' = the pinned one) ]
    val resources

    output:
    tuple val(meta), val(in_n5), val(in_ds), val(out_n5), val(out_ds), val(blocks), emit: blocks
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('segment_volume.py --version | cut -d " " -f 3'), topic: versions, emit: versions_segment_volume

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def scaling_arg = scaling ? "--scaling ${scaling}" : ''
    def mask_arg = mask ? "--mask ${mask}" : ''
    // one model load for all of the task's blocks; each block keeps its own done marker
    def block_args = blocks.collect { block -> "--start ${block.start} --end ${block.end}" }.join(' \\\n        ')
    def io_threads = Math.max(task.cpus as int, 2)  // chunk reads and writes overlap the model: at least 2
    """
    segment_volume.py \\
        --input ${in_n5} --input_data_set ${in_ds} \\
        --output ${out_n5} --output_data_set ${out_ds} \\
        --model_path ${model} \\
        ${block_args} ${scaling_arg} ${mask_arg} \\
        --cpus ${task.cpus} --io-threads ${io_threads} --no-progress ${options} ${args}
    """

    stub:
    def boxes = blocks.collect { block -> "${block.start}..${block.end}" }.join(' ')
    """
    echo "stub: blocks ${boxes} of ${out_n5}:${out_ds} not segmented"
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}

// The container of a 'container:dataset' mask (split at the last colon, as segment_volume.py
// splits it); '' for no mask.
def maskContainer(mask) {
    def spec = "${mask ?: ''}"
    return spec.contains(':') ? spec.substring(0, spec.lastIndexOf(':')) : ''
}
