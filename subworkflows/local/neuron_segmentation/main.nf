include { PLAN_BLOCKS    } from '../../../modules/local/plan_blocks'
include { SCALING_FACTOR } from '../../../modules/local/scaling_factor'
include { CREATE_VOLUME  } from '../../../modules/local/create_volume'
include { SEGMENT_VOLUME } from '../../../modules/local/segment_volume'

/*
 * Block-wise U-Net segmentation of N5 volumes, up to blocks_per_task blocks per task.
 *
 * For each volume: (1) plan the blocks and the scaling-factor sampling jobs (bin/plan_blocks.py:
 * the chunk grid, partial_volume and the host's arithmetic live in the Python library, not here),
 * (2) optionally sample a global intensity scaling factor in parallel jobs and average it,
 * (3) create the output dataset (input dims and chunks), (4) segment the blocks, consecutive ones
 * grouped into tasks (one model load per task), (5) emit the volume as soon as all of its own
 * tasks are done.
 */
workflow NEURON_SEGMENTATION {

    take:
    ch_volumes  // channel: [ meta, in_n5, in_dataset, out_n5, out_dataset ]  (absolute container paths)
    ch_model    // channel (value): model file (.h5)
    options     // map: see segmentationOptions() for the keys and their defaults

    main:
    def opts = segmentationOptions(options)
    if (opts.scaling_plots_dir) {
        file(opts.scaling_plots_dir).mkdirs()  // bound into the scaling containers, so it must exist
    }
    def ch_inputs = ch_volumes.map { meta, in_n5, in_ds, out_n5, out_ds ->
        file(out_n5).parent.mkdirs()  // bound into the create-volume container, so it must exist
        [meta, in_n5, in_ds, out_n5, out_ds]
    }

    //
    // The plan of each volume: its blocks on the chunk grid and its scaling sampling jobs
    //
    PLAN_BLOCKS(ch_inputs.map { meta, in_n5, in_ds, _out_n5, _out_ds -> [meta, in_n5, in_ds] }, planArgs(opts))
    def ch_plan = PLAN_BLOCKS.out.plan
        .map { meta, blocks, jobs -> [meta.id, planLines(blocks.text), planLines(jobs.text)] }

    //
    // Global scaling factor: sampling jobs in parallel, then the mean of the jobs' factors
    //
    def ch_jobs = ch_inputs
        .map { meta, in_n5, in_ds, _out_n5, _out_ds -> [meta.id, meta, in_n5, in_ds] }
        .join(ch_plan)
        .flatMap { _id, meta, in_n5, in_ds, _blocks, jobs ->
            (0..<jobs.size()).collect { index ->
                def job = jobs[index]
                [meta + [job: [index: index, count: jobs.size()]], in_n5, in_ds, job.start, job.end, job.fraction]
            }
        }
    SCALING_FACTOR(ch_jobs, sizeText(opts.scaling_partition_size), opts.scaling_plots_dir, opts.scaling_resources)

    def ch_sampled = SCALING_FACTOR.out.scaling
        .map { meta, value -> [groupKey(meta.id, meta.job.count), meta.id, value] }
        .groupTuple()
        .map { _key, ids, values -> [ids[0], meanScaling(values)] }

    def ch_fixed = ch_plan
        .filter { _id, _blocks, jobs -> jobs.isEmpty() }
        .map { id, _blocks, _jobs -> [id, normaliseScaling(opts.user_defined_scaling)] }

    def ch_scaling = ch_sampled.mix(ch_fixed)  // [ id, scaling ('' = per-block factor) ]

    //
    // Output dataset: created before any block runs (an identical existing one is kept)
    //
    CREATE_VOLUME(ch_inputs, createArgs(opts))

    //
    // The planned blocks in tasks of up to blocks_per_task consecutive blocks (one model load each)
    //
    def ch_tasks = CREATE_VOLUME.out.volume
        .map { meta, in_n5, in_ds, out_n5, out_ds -> [meta.id, meta, in_n5, in_ds, out_n5, out_ds] }
        .join(ch_scaling)
        .join(ch_plan)
        .flatMap { _id, meta, in_n5, in_ds, out_n5, out_ds, scaling, blocks, _jobs ->
            blockTasks(blocks, opts.blocks_per_task as int).collect { group ->
                [meta + [scaling: scaling, task: group.task], in_n5, in_ds, out_n5, out_ds, group.blocks, scaling]
            }
        }
    SEGMENT_VOLUME(ch_tasks, ch_model, segmentArgs(opts), opts.mask, opts.segmentation_resources)

    //
    // Per-volume barrier: each volume is released as soon as its own tasks are all done
    //
    def ch_segmented = SEGMENT_VOLUME.out.blocks
        .map { meta, in_n5, in_ds, out_n5, out_ds, _blocks ->
            [groupKey(meta.id, meta.task.count), meta.findAll { key, _value -> key != 'task' }, in_n5, in_ds, out_n5, out_ds]
        }
        .groupTuple()
        .map { _key, metas, in_n5s, in_dss, out_n5s, out_dss -> [metas[0], in_n5s[0], in_dss[0], out_n5s[0], out_dss[0]] }

    emit:
    segmented = ch_segmented  // channel: [ meta, in_n5, in_dataset, out_n5, out_dataset ], one per volume
    scaling   = ch_scaling    // channel: [ id, scaling factor ('' = each block computes its own) ]
}

// ------------------------------------------------------------------------------------------------
// Options. Geometry (blocks, regions, chunk grids, sampling jobs) is planned by bin/plan_blocks.py.
// ------------------------------------------------------------------------------------------------

// The options map with defaults filled in (the host pipeline's defaults), checked.
def segmentationOptions(Map options) {
    def defaults = [
        partition_size              : '512',            // block edge(s), one number or x,y,z: rounded up to the chunk grid
        partial_volume              : '',               // 'x0,y0,z0,dx,dy,dz' or '' for the whole volume
        scaling_tiles               : 0,                // number of sampled tiles (wins over the fraction)
        scaling_fraction            : 0,                // fraction of sampled tiles, used when 0 < f < 1
        scaling_partition_size      : '396,396,396',    // sampling tile size
        max_scaling_tiles_per_job   : 40,
        scaling_plots_dir           : '',
        user_defined_scaling        : '',               // used as-is when no sampling runs
        binary                      : false,            // uint8 0/1 output instead of float32 probabilities
        compression                 : 'gzip',           // codec of the output dataset
        overwrite                   : false,            // replace an output dataset of other dims, chunks or dtype
        blocks_per_task             : 4,                // blocks per SEGMENT_VOLUME task (one model load each)
        precision                   : 'fp32',           // segment_volume.py --precision: fp32, bf16 or fp16
        mask                        : '',               // tissue mask 'container:dataset' (absolute container), '' = none
        skip_constant               : true,             // constant input tiles answered without the model
        segmentation_args           : '',               // extra segment_volume.py flags
        segmentation_resources      : [:],              // [cpus:, memory:, container:] of SEGMENT_VOLUME
        scaling_resources           : [:],              // [cpus:, memory:, container:] of SCALING_FACTOR
    ]
    def opts = defaults + options
    def perTask = "${opts.blocks_per_task}".trim()
    if (!(perTask ==~ /\d+/) || perTask.toInteger() < 1) {
        error("blocks_per_task must be a whole number of 1 or more, not '${opts.blocks_per_task}'")
    }
    if (!['fp32', 'bf16', 'fp16'].contains("${opts.precision}".trim())) {
        error("segmentation_precision must be fp32, bf16 or fp16, not '${opts.precision}'")
    }
    if (opts.mask && !("${opts.mask}" ==~ /.+:.+/)) {
        error("segmentation_mask '${opts.mask}' is not CONTAINER:DATASET (e.g. /data/mask.n5:/mask/s0)")
    }
    return opts + [blocks_per_task: perTask.toInteger()]
}

// A size given as a number, an 'x,y,z' string or a list, as the 'x,y,z' (or 'n') text the scripts take.
def sizeText(value) {
    return "${value}".replace('[', '').replace(']', '').replace(' ', '')
}

// plan_blocks.py flags: the blocks and, when sampling is on, the scaling jobs (the host's arithmetic).
def planArgs(Map opts) {
    return [
        "--partition_size ${sizeText(opts.partition_size)}",
        opts.partial_volume ? "--partial_volume ${sizeText(opts.partial_volume)}" : '',
        "--scaling_tiles ${opts.scaling_tiles}",
        "--scaling_fraction ${opts.scaling_fraction}",
        "--scaling_partition_size ${sizeText(opts.scaling_partition_size)}",
        "--max_scaling_tiles_per_job ${opts.max_scaling_tiles_per_job}",
    ].findAll { arg -> arg != '' }.join(' ')
}

// create_volume.py flags: dtype, codec, and --overwrite only when asked for.
def createArgs(Map opts) {
    return [
        "--dtype ${opts.binary ? 'uint8' : 'float32'}",
        "--compression ${opts.compression}",
        opts.overwrite ? '--overwrite' : '',
    ].findAll { arg -> arg != '' }.join(' ')
}

// segment_volume.py flags: the caller's, the region blocks are clipped to (so a block that ends
// inside a chunk at the region's edge is accepted: no other block writes that chunk), the precision
// and constant-tile skipping. The mask is the module's own input (its container is bound).
def segmentArgs(Map opts) {
    return [
        "${opts.segmentation_args}",
        opts.partial_volume ? "--partial_volume ${sizeText(opts.partial_volume)}" : '',
        "--precision ${opts.precision}",
        opts.skip_constant ? '--skip-constant' : '--no-skip-constant',
    ].findAll { arg -> arg != '' }.join(' ')
}

// A volume's planned blocks (planLines) as SEGMENT_VOLUME tasks of up to `perTask` consecutive
// blocks, in plan order; the last task may be shorter. Per task: [ task: [ index:, count:,
// range: 'first-last' (plan indices, as segment_volume.py --block-index takes them),
// volume_blocks: ], blocks: [ [start:, end:], ... ] ]. Only indices are grouped: no geometry.
def blockTasks(List blocks, int perTask) {
    def groups = blocks.collate(perTask)
    return groups.withIndex().collect { group, index ->
        def first = index * perTask
        def last = first + group.size() - 1
        [
            task   : [index: index, count: groups.size(), range: [first, last].unique().join('-'), volume_blocks: blocks.size()],
            blocks : group.collect { block -> [start: block.start, end: block.end] },
        ]
    }
}

// The lines of a plan file: 'x0,y0,z0,x1,y1,z1' (blocks) or 'x0,y0,z0,x1,y1,z1 fraction' (scaling jobs).
def planLines(String text) {
    return text.readLines().findAll { line -> line.trim() }.collect { line ->
        def fields = line.trim().tokenize(' ')
        def box = fields[0].tokenize(',')
        [start: box[0..2].join(','), end: box[3..5].join(','), fraction: fields.size() > 1 ? fields[1] : '']
    }
}

// '' for an absent factor ('', null, 'null', 'nan'); the value otherwise.
def normaliseScaling(value) {
    def text = "${value ?: ''}".trim()
    return ['', 'null', 'nan', 'NaN'].contains(text) ? '' : text
}

// Plain mean of the jobs' factors, skipping null/nan ones; '' when none is valid. The factors are
// summed in sorted order, so the value (and the blocks' cache keys and done markers) does not
// depend on the order in which the jobs finished.
def meanScaling(List values) {
    def valid = values.collect { value -> normaliseScaling(value) }.findAll { value -> value != '' }.collect { value -> value as double }.toSorted()
    return valid ? (valid.sum() / valid.size()).toString() : ''
}
