process CREATE_VOLUME {
    tag "${meta.id}"
    label 'process_single'

    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: 'ghcr.io/janeliascicomp/exllsm-create-volume:0.2.0'}"
    // The template is read in place; the output container may not exist yet, so its parent is bound.
    containerOptions "${bindMounts(workflow.containerEngine, [file(in_n5), file(out_n5).parent])}"

    input:
    tuple val(meta), val(in_n5), val(in_ds), val(out_n5), val(out_ds)
    // create_volume.py flags from the pipeline: --dtype, --compression, --overwrite
    val options

    output:
    tuple val(meta), val(in_n5), val(in_ds), val(out_n5), val(out_ds), emit: volume
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('create_volume.py --version | cut -d " " -f 3'), topic: versions, emit: versions_create_volume

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    export EXLLSM_OVERWRITE_HINT='the pipeline param overwrite_output replaces it'
    create_volume.py \\
        --input ${in_n5} --input_data_set ${in_ds} \\
        --output ${out_n5} --output_data_set ${out_ds} \\
        ${options} ${args}
    """

    stub:
    """
    echo "stub: ${out_n5}:${out_ds} (${options}) not created"
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
