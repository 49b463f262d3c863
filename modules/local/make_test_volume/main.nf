process MAKE_TEST_VOLUME {
    tag "${meta.id}"
    label 'process_single'

    conda "${moduleDir}/environment.yml"
    // No TensorFlow needed: the create-volume image carries make_test_volume.py too.
    container "${task.ext.container ?: 'ghcr.io/janeliascicomp/exllsm-create-volume:0.2.0'}"
    containerOptions "${bindMounts(workflow.containerEngine, [file(n5).parent])}"

    input:
    tuple val(meta), val(n5), val(dataset)
    val shape
    val chunks

    output:
    tuple val(meta), val(n5), val(dataset), emit: volume
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('make_test_volume.py --version | cut -d " " -f 3'), topic: versions, emit: versions_make_test_volume

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    make_test_volume.py --output ${n5} --dataset ${dataset} --shape ${shape} --chunks ${chunks} ${args}
    """

    stub:
    """
    echo "stub: ${n5}:${dataset} (${shape}) not written"
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
