process BUILD_PYRAMID {
    tag "${meta.id}:${level == 'create' ? 'create levels' : 's' + level + ' blocks ' + (meta.task?.range ?: 'all')}"
    label 'process_low'

    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: 'ghcr.io/janeliascicomp/exllsm-create-volume:0.2.0'}"
    // The pyramid is written in place beside s0, inside its container: bind the container.
    containerOptions "${bindMounts(workflow.containerEngine, [n5])}"

    input:
    // level: 'create' (create the level datasets and plan their blocks) or a level k >= 1 (compute the
    // task's blocks of s<k> from s<k-1>: every task of level k-1 must have finished)
    // blocks: the task's blocks of level k, consecutive in pyramid/s<k>.txt: [ [start: 'x0,y0,z0', end: 'x1,y1,z1'], ... ]; [] for 'create'
    tuple val(meta), val(n5), val(dataset), val(level), val(blocks)
    // build_pyramid.py flags from the pipeline, the same for every step: --method, --resolution, --max-levels,
    // --partition-size, --overwrite (the last four matter to 'create' only)
    val options

    output:
    tuple val(meta), val(n5), val(dataset), val(level), val(blocks), emit: done
    // 'create' only: one block plan per level, pyramid/s1.txt, pyramid/s2.txt, ...
    tuple val(meta), path('pyramid/s*.txt'), emit: plans, optional: true
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('build_pyramid.py --version | cut -d " " -f 3'), topic: versions, emit: versions_build_pyramid

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def step = level == 'create'
        ? '--create-only --plans-dir pyramid'
        : "--level ${level} " + blocks.collect { block -> "--start ${block.start} --end ${block.end}" }.join(' \\\n        ')
    def io_threads = Math.max(task.cpus as int, 2)
    """
    export EXLLSM_OVERWRITE_HINT='the pipeline param overwrite_output replaces it'
    build_pyramid.py \\
        --input ${n5} --input_data_set ${dataset} \\
        ${step} \\
        --io-threads ${io_threads} ${options} ${args}
    """

    stub:
    def boxes = blocks.collect { block -> "${block.start}..${block.end}" }.join(' ')
    // 'create': one placeholder block of s1, so that a -stub run goes through the level tasks
    def command = level == 'create'
        ? 'mkdir -p pyramid && echo "0,0,0,1,1,1" > pyramid/s1.txt'
        : "echo 'stub: blocks ${boxes} of level s${level} of ${n5}:${dataset} not computed'"
    """
    ${command}
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
