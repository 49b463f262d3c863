process MAKE_TRAINING_REGIONS {
    tag "${meta.id}"
    label 'process_single'

    conda "${moduleDir}/environment.yml"
    // No GPU needed; the training image carries make_training_regions.py with the other training stages.
    container "${task.ext.container ?: 'ghcr.io/janeliascicomp/exllsm-train-unet:0.2.0'}"

    input:
    tuple val(meta), val(names)
    val shape
    val options

    output:
    tuple val(meta), path('regions/*/*.h5', arity: '1..*'), emit: regions
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('make_training_regions.py --version | cut -d " " -f 3'), topic: versions, emit: versions_make_training_regions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    make_training_regions.py --output-dir regions --names ${names} --shape ${shape} ${options} ${args}
    """

    stub:
    def files = names.tokenize(',').collect { name -> "regions/${name}/${name}.h5" }.join(' ')
    """
    for region in ${files}; do mkdir -p "\$(dirname "\$region")" && touch "\$region"; done
    """
}
