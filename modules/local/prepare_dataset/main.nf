process PREPARE_DATASET {
    tag "${meta.id}"
    label 'process_medium'

    conda "${moduleDir}/environment.yml"
    // No GPU needed; the training image carries prepare_dataset.py with the other training stages.
    container "${task.ext.container ?: 'ghcr.io/janeliascicomp/exllsm-train-unet:0.2.0'}"

    input:
    tuple val(meta), path(regions, arity: '1..*')
    val options

    output:
    tuple val(meta), path("${meta.id}.h5"), emit: dataset
    tuple val(meta), path("${meta.id}_diagnostics"), emit: diagnostics
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('prepare_dataset.py --version | cut -d " " -f 3'), topic: versions, emit: versions_prepare_dataset

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def region_args = regions.collect { region -> "--region-file ${region}" }.join(' ')
    """
    prepare_dataset.py \\
        ${region_args} \\
        --dataset-dir ${meta.id}.h5 --output-dir ${meta.id}_diagnostics ${options} ${args}
    """

    stub:
    """
    touch ${meta.id}.h5
    mkdir -p ${meta.id}_diagnostics
    """
}
