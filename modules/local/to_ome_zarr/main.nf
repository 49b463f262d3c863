process TO_OME_ZARR {
    tag "${meta.id}"
    label 'process_low'

    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: 'ghcr.io/janeliascicomp/exllsm-create-volume:0.2.0'}"
    // The sources are read in place and the OME-Zarr is written beside them (under a temporary name,
    // renamed when complete): bind every source container and the output's parent.
    containerOptions "${bindMounts(workflow.containerEngine, [n5] + labels.collect { label -> label.n5 } + [file(out_zarr).parent])}"

    input:
    // dataset: the image (probabilities), e.g. /s0; with siblings s1, s2, ... its pyramid is copied too
    // labels: [ [ name:'mask', n5:'/abs/seg.n5', dataset:'/mask/s0' ], ... ] with the image's levels; [] for none
    tuple val(meta), val(n5), val(dataset), val(labels), val(out_zarr)
    // to_ome_zarr.py flags from the pipeline: --resolution x,y,z and --unit (when s0 records no voxel
    // size), --chunks x,y,z, --name, --overwrite
    val options

    output:
    tuple val(meta), val(out_zarr), emit: zarr
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('to_ome_zarr.py --version | cut -d " " -f 3'), topic: versions, emit: versions_to_ome_zarr

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def label_args = labels.collect { label -> "--label ${label.name}=${label.n5}:${label.dataset}" }.join(' ')
    def io_threads = Math.max(task.cpus as int, 2)
    """
    export EXLLSM_OVERWRITE_HINT='the pipeline param overwrite_output replaces it'
    to_ome_zarr.py \\
        --input ${n5} --input_data_set ${dataset} ${label_args} \\
        --output ${out_zarr} \\
        --io-threads ${io_threads} ${options} ${args}
    """

    stub:
    """
    echo "stub: ${out_zarr} (image ${n5}:${dataset}, labels ${labels.collect { label -> label.name }.join(',')}) not written"
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
