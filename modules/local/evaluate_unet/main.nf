process EVALUATE_UNET {
    tag "${meta.id}"
    label 'process_medium'
    label 'process_gpu'
    label 'withGPU'

    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: 'ghcr.io/janeliascicomp/exllsm-train-unet:0.2.0'}"

    input:
    tuple val(meta), path(dataset), path(model), path(keys)
    val options

    output:
    tuple val(meta), path("${meta.id}/evaluation/report.json"), path("${meta.id}/evaluation/report.txt"), emit: report
    tuple val(meta), path("${meta.id}/evaluation"), emit: evaluation
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('evaluate_unet.py --version | cut -d " " -f 3'), topic: versions, emit: versions_evaluate_unet

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    // The listed keys (a training split: its validation examples), or every example of the dataset
    def keys_arg = keys ? "--keys-file ${keys}" : '--n-examples 0'
    """
    evaluate_unet.py \\
        --dataset ${dataset} --model-path ${model} \\
        --output-dir ${meta.id}/evaluation ${keys_arg} ${options} ${args}
    """

    stub:
    """
    mkdir -p ${meta.id}/evaluation
    echo '{}' > ${meta.id}/evaluation/report.json
    touch ${meta.id}/evaluation/report.txt
    """
}
