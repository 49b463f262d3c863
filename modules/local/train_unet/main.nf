process TRAIN_UNET {
    tag "${meta.id}"
    label 'process_high'
    label 'process_gpu'
    label 'withGPU'

    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: 'ghcr.io/janeliascicomp/exllsm-train-unet:0.2.0'}"

    input:
    tuple val(meta), path(dataset)
    path pretrained
    val options

    output:
    tuple val(meta), path("${meta.id}/${meta.id}_best.h5"), path("${meta.id}/${meta.id}_split.json"), emit: model
    tuple val(meta), path("${meta.id}/${meta.id}.log"), emit: log
    tuple val(meta), path("${meta.id}"), emit: checkpoints
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('train_unet.py --version | cut -d " " -f 3'), topic: versions, emit: versions_train_unet

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    // Fine-tuning: the given model's weights and architecture, a fresh optimizer, epochs from 1
    def pretrained_arg = pretrained ? "--resume --pre-trained-model ${pretrained}" : ''
    """
    train_unet.py \\
        --training-dataset ${dataset} \\
        --output-dir ${meta.id} --model-name ${meta.id} ${pretrained_arg} \\
        --parallel-calls ${task.cpus} ${options} ${args}
    """

    stub:
    """
    mkdir -p ${meta.id}
    touch ${meta.id}/${meta.id}_best.h5 ${meta.id}/${meta.id}.log
    echo '{"training": [], "validation": []}' > ${meta.id}/${meta.id}_split.json
    """
}
