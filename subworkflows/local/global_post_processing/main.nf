include { CREATE_VOLUME                           } from '../../../modules/local/create_volume'
include { LABEL_BLOCKS as HYSTERESIS_LABEL_BLOCKS } from '../../../modules/local/label_blocks'
include { MERGE_LABELS as HYSTERESIS_MERGE_LABELS } from '../../../modules/local/merge_labels'
include { LABEL_BLOCKS as SIZE_LABEL_BLOCKS       } from '../../../modules/local/label_blocks'
include { MERGE_LABELS as SIZE_MERGE_LABELS       } from '../../../modules/local/merge_labels'
include { WRITE_LABELS                            } from '../../../modules/local/write_labels'
include { planLines; blockTasks; whenTasksDone; recordsFolder } from '../utils_blocks'

/*
 * Post-processing over the whole volume, in blocks: the original tool's hysteresis and small-object
 * removal, equal to post-processing one block that covers the volume (for any plan), instead of
 * inside each block (where objects cut by a block's border are judged by their part in it).
 *
 * For each volume, with the blocks of the plan its raw probabilities were segmented in:
 * (1) create the output dataset (float32, or uint8 for a binary mask; the raw dataset's dims and
 * chunks), beside the passes;
 * (2) hysteresis pass: label p > low per block task, then one merge that keeps the objects holding
 * a voxel p > high (label_blocks.py --seed-threshold, merge_labels.py --require-seed --min-size 0);
 * (3) size pass, once the hysteresis merge is done: label p > small_region_probability_threshold
 * inside the kept objects (--restrict), then one merge that drops the objects under
 * small_region_size_threshold voxels; (4) once the size merge is done, write each block of the
 * post-processed probabilities (write_labels.py --post-processing); (5) emit the volume when all
 * of its write tasks are done. Every per-block step runs blocks_per_task blocks per task; each merge
 * waits for all tasks of its pass of that volume only (groupKey barrier).
 */
workflow GLOBAL_POST_PROCESSING {

    take:
    ch_volumes  // channel: [ meta, raw_n5, raw_dataset, out_n5, out_dataset, blocks.txt ]: the plan the raw dataset was segmented in
    options     // map: see postProcessingOptions() for the keys and their defaults

    main:
    def opts = postProcessingOptions(options)

    // Each volume with its plan's blocks and the records folders of its two passes
    def ch_inputs = ch_volumes.map { meta, raw_n5, raw_ds, out_n5, out_ds, plan ->
        [
            meta.id, meta, raw_n5, raw_ds, out_n5, out_ds, plan, planLines(plan.text),
            recordsFolder(out_n5, out_ds, 'hysteresis'), recordsFolder(out_n5, out_ds, 'size'),
        ]
    }

    //
    // The output dataset: float32 (uint8 for a binary mask), the raw dataset's dims and chunks (an
    // identical existing one is kept)
    //
    CREATE_VOLUME(
        ch_inputs.map { _id, meta, raw_n5, raw_ds, out_n5, out_ds, _plan, _blocks, _hyst, _size -> [meta, raw_n5, raw_ds, out_n5, out_ds] },
        outputArgs(opts),
    )

    //
    // Hysteresis pass: objects of p > low, kept when they hold a voxel of p > high
    //
    HYSTERESIS_LABEL_BLOCKS(
        ch_inputs.flatMap { _id, meta, raw_n5, raw_ds, _out_n5, _out_ds, _plan, blocks, hyst, _size ->
            passTasks(meta, raw_n5, raw_ds, hyst, '', blocks, opts.blocks_per_task as int)
        },
        hysteresisLabelArgs(opts),
        opts.resources,
    )
    HYSTERESIS_MERGE_LABELS(
        whenTasksDone(HYSTERESIS_LABEL_BLOCKS.out.blocks)
            .map { meta, _raw_n5, _raw_ds, _records, _restrict, _blocks -> [meta.id] }
            .join(ch_inputs)
            .map { _id, meta, raw_n5, raw_ds, _out_n5, _out_ds, plan, _blocks, hyst, _size -> [meta, raw_n5, raw_ds, hyst, plan] },
        hysteresisMergeArgs(),
        opts.merge_resources,
    )

    //
    // Size pass, inside the kept objects: objects of p > small_region_probability_threshold with
    // fewer than small_region_size_threshold voxels are removed
    //
    SIZE_LABEL_BLOCKS(
        HYSTERESIS_MERGE_LABELS.out.merged
            .map { meta, _raw_n5, _raw_ds, _records -> [meta.id] }
            .join(ch_inputs)
            .flatMap { _id, meta, raw_n5, raw_ds, _out_n5, _out_ds, _plan, blocks, hyst, size ->
                passTasks(meta, raw_n5, raw_ds, size, hyst, blocks, opts.blocks_per_task as int)
            },
        sizeLabelArgs(opts),
        opts.resources,
    )
    SIZE_MERGE_LABELS(
        whenTasksDone(SIZE_LABEL_BLOCKS.out.blocks)
            .map { meta, _raw_n5, _raw_ds, _records, _restrict, _blocks -> [meta.id] }
            .join(ch_inputs)
            .map { _id, meta, raw_n5, raw_ds, _out_n5, _out_ds, plan, _blocks, _hyst, size -> [meta, raw_n5, raw_ds, size, plan] },
        sizeMergeArgs(opts),
        opts.merge_resources,
    )

    //
    // The post-processed probabilities, block by block, into the output dataset (once it exists
    // and both passes are merged)
    //
    WRITE_LABELS(
        SIZE_MERGE_LABELS.out.merged
            .map { meta, _raw_n5, _raw_ds, _records -> [meta.id] }
            .join(CREATE_VOLUME.out.volume.map { meta, _raw_n5, _raw_ds, _out_n5, _out_ds -> [meta.id] })
            .join(ch_inputs)
            .flatMap { _id, meta, raw_n5, raw_ds, out_n5, out_ds, _plan, blocks, hyst, size ->
                blockTasks(blocks, opts.blocks_per_task as int).collect { group ->
                    [meta + [task: group.task], raw_n5, raw_ds, out_n5, out_ds, [hyst, size], group.blocks]
                }
            },
        '',
        opts.resources,
    )

    //
    // Per-volume barrier: the volume is released once all of its write tasks are done
    //
    def ch_processed = whenTasksDone(WRITE_LABELS.out.blocks)
        .map { meta, raw_n5, raw_ds, out_n5, out_ds, _blocks -> [meta, raw_n5, raw_ds, out_n5, out_ds] }

    emit:
    processed = ch_processed  // channel: [ meta, raw_n5, raw_dataset, out_n5, out_dataset ], one per volume, after its last block
}

// ------------------------------------------------------------------------------------------------
// Options. The thresholds are the host's neuron_seg_* params; the blocks are the segmentation's plan.
// ------------------------------------------------------------------------------------------------

// The options map with defaults filled in (the host pipeline's thresholds), checked.
def postProcessingOptions(Map options) {
    def defaults = [
        high_threshold                     : 0.98,         // hysteresis seeds: p > high
        low_threshold                      : 0.2,          // hysteresis objects: p > low
        small_region_probability_threshold : 0.9,          // small objects: of p > this ...
        small_region_size_threshold        : 1000,         // ... with fewer voxels are removed
        compression                        : 'gzip',       // codec of the output dataset
        overwrite                          : false,        // replace an output dataset of other dims, chunks or dtype
        binary                             : false,        // the raw dataset is a uint8 0/1 mask (so is the output)
        blocks_per_task                    : 4,            // blocks per labelling and writing task
        resources                          : [:],          // [cpus:, memory:, container:] of the per-block tasks
        merge_resources                    : [:],          // [cpus:, memory:, container:] of the merges
    ]
    def opts = defaults + options
    def size = "${opts.small_region_size_threshold}".trim()
    if (!(size ==~ /\d+/)) {
        error("neuron_seg_small_region_size_th must be a whole number of voxels, not '${opts.small_region_size_threshold}'")
    }
    return opts + [small_region_size_threshold: size.toInteger(), merge_resources: opts.merge_resources ?: opts.resources]
}

// create_volume.py flags of the output: float32 probabilities (uint8 for a binary mask), the raw
// dataset's chunks.
def outputArgs(Map opts) {
    def dtype = opts.binary ? 'uint8' : 'float32'
    return ["--dtype ${dtype} --compression ${opts.compression}", opts.overwrite ? '--overwrite' : ''].findAll { arg -> arg != '' }.join(' ')
}

// label_blocks.py flags of the hysteresis pass (26-connectivity, as the original's post-processing).
def hysteresisLabelArgs(Map opts) {
    return "--threshold ${opts.low_threshold} --seed-threshold ${opts.high_threshold} --connectivity 26"
}

// merge_labels.py flags of the hysteresis pass: keep every object holding a seed, whatever its size.
def hysteresisMergeArgs() {
    return '--min-size 0 --require-seed'
}

// merge_labels.py flags of the size pass.
def sizeMergeArgs(Map opts) {
    return "--min-size ${opts.small_region_size_threshold}"
}

// label_blocks.py flags of the size pass.
def sizeLabelArgs(Map opts) {
    return "--threshold ${opts.small_region_probability_threshold} --connectivity 26"
}

// The LABEL_BLOCKS tasks of one pass of a volume: [ meta + task, n5, dataset, records, restrict, blocks ].
def passTasks(Map meta, String n5, String dataset, String records, String restrict, List blocks, int perTask) {
    return blockTasks(blocks, perTask).collect { group -> [meta + [task: group.task], n5, dataset, records, restrict, group.blocks] }
}
