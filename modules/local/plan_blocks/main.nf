process PLAN_BLOCKS {
    tag "${meta.id}"
    label 'process_single'

    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: 'ghcr.io/janeliascicomp/exllsm-create-volume:0.2.0'}"
    // The input dataset's attributes are read in place: bind its container.
    containerOptions "${bindMounts(workflow.containerEngine, [n5])}"

    input:
    tuple val(meta), val(n5), val(dataset)
    // the U-Net model file (.h5): its tile grid and context find the tiles wholly in empty space for
    // the cost report ([] for none: labels and other plans without a model)
    path model
    // plan_blocks.py flags: --partition_size, --partial_volume, --scaling_*, and for the cost report
    // --rate-mvox-s, --as_binary_mask, --model_input_shape (see meta.yml)
    val options

    output:
    tuple val(meta), path('blocks.txt'), path('scaling_jobs.txt'), emit: plan
    // the run's cost before any block runs: blocks, voxels to compute, time per device, output size
    tuple val(meta), path('plan.json'), emit: report
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('plan_blocks.py --version | cut -d " " -f 3'), topic: versions, emit: versions_plan_blocks

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def model_arg = model ? "--model ${model}" : ''
    """
    plan_blocks.py \\
        --input ${n5} --input_data_set ${dataset} \\
        --output blocks.txt --scaling_output scaling_jobs.txt --report plan.json \\
        ${model_arg} ${options} ${args}
    """

    stub:
    // one placeholder block, so that a -stub run goes through segmentation and the barrier
    """
    echo "0,0,0,1,1,1" > blocks.txt
    touch scaling_jobs.txt
    echo '{"blocks": 1}' > plan.json
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
