process MERGE_LABELS {
    tag "${meta.id}"
    label 'process_single'

    // Resources and image as a value from the pipeline (the host never reads this project's conf/);
    // a config's withName/withLabel setting still wins. Memory grows with the number of objects and
    // face contacts, not with the volume (merge_labels.py prints its peak). The image is the
    // scaling-factor stage's: SciPy and the N5 stack, no TensorFlow, and the components scripts.
    cpus { (resources.cpus ?: 1) as Integer }
    memory { (resources.memory ?: '4 GB') as String }
    conda "${moduleDir}/environment.yml"
    container "${task.ext.container ?: ((resources.container as String) ?: 'ghcr.io/janeliascicomp/exllsm-scaling-factor:0.2.0')}"
    // The input N5 is read in place (its identity keys the records) and the merge table is written
    // into the records folder in place; the block plan is a staged file.
    containerOptions "${bindMounts(workflow.containerEngine, [in_n5, records])}"

    input:
    // records: the folder LABEL_BLOCKS wrote every block of the plan into
    tuple val(meta), val(in_n5), val(in_ds), val(records), path(plan)
    // merge_labels.py flags of the pass: --min-size, --require-seed
    val options
    // [ cpus: int, memory: '4 GB', container: image ('' = the pinned one) ]
    val resources

    output:
    // the records folder now holds the merge table (table.npz) that WRITE_LABELS and a --restrict pass read
    tuple val(meta), val(in_n5), val(in_ds), val(records), emit: merged
    tuple val(meta), path('objects.csv'), path('objects.json'), emit: objects
    tuple val(meta), path('merge.log'), emit: log
    tuple val("${task.process}"), val('exllsm-neuronseg'), eval('merge_labels.py --version | cut -d " " -f 3'), topic: versions, emit: versions_merge_labels

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    merge_labels.py \\
        --input ${in_n5} --input_data_set ${in_ds} \\
        --blocks ${plan} --records ${records} \\
        --objects objects.csv ${options} ${args} > merge.log
    cat merge.log
    """

    stub:
    """
    echo "id,voxels,x0,y0,z0,x1,y1,z1,centroid_x,centroid_y,centroid_z,mean_value,max_value" > objects.csv
    echo '{"summary": {}, "objects": []}' > objects.json
    echo "stub: ${records} not merged" > merge.log
    """
}

// Bind options for directories used in place: "-B dir" (Singularity/Apptainer) or "-v dir:dir" (Docker, Podman).
def bindMounts(String engine, List dirs) {
    def flag = engine in ['singularity', 'apptainer'] ? '-B' : '-v'
    return dirs.findAll { dir -> dir != null && dir != '' }.collect { dir -> dir.toString() }.unique().collect { dir ->
        flag == '-B' ? "-B ${dir}" : "-v ${dir}:${dir}"
    }.join(' ')
}
