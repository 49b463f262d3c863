include { CREATE_VOLUME                    } from '../../../modules/local/create_volume'
include { PLAN_BLOCKS as PLAN_LABEL_BLOCKS } from '../../../modules/local/plan_blocks'
include { LABEL_BLOCKS                     } from '../../../modules/local/label_blocks'
include { MERGE_LABELS                     } from '../../../modules/local/merge_labels'
include { WRITE_LABELS                     } from '../../../modules/local/write_labels'
include { QUICKLOOK                        } from '../../../modules/local/quicklook'
include { PYRAMID                          } from '../pyramid'
include { planLines; blockTasks; sizeText; whenTasksDone; recordsFolder } from '../utils_blocks'

/*
 * Connected components of segmented volumes over blocks, equal to labelling each whole volume at
 * once: uint64 labels in the host's connected_dataset (what its Spark N5ConnectedComponentsSpark
 * writes), an object table, a quick-look picture and optionally a pyramid of the labels.
 *
 * For each volume: (1) create the labels dataset (uint64, the segmentation's dims, the label chunks
 * connected_comps_block_size); (2) plan the blocks on the label chunk grid (bin/plan_blocks.py on the
 * labels dataset, with the segmentation's partition size and region: the segmentation's own plan
 * whenever that one is on the label chunk grid, as with the defaults); (3) label the blocks,
 * blocks_per_task per task (records in <labels container>/.exllsm-records/); (4) merge once all of
 * the volume's label tasks are done (groupKey barrier): ids, the size filter and the object table;
 * (5) write the labels, blocks_per_task blocks per task; (6) release the volume when all of its
 * write tasks are done, then draw its labels and build their pyramid.
 */
workflow CONNECTED_COMPONENTS {

    take:
    ch_volumes  // channel: [ meta, in_n5, in_dataset, seg_n5, seg_dataset, labels_n5, labels_dataset ]: meta.id names the labels
    options     // map: see componentsOptions() for the keys and their defaults

    main:
    def opts = componentsOptions(options)
    def ch_inputs = ch_volumes.map { meta, in_n5, in_ds, seg_n5, seg_ds, labels_n5, labels_ds ->
        if (seg_ds.tokenize('/') == labels_ds.tokenize('/') && file(seg_n5) == file(labels_n5)) {
            error("the connected components dataset ${labels_n5}:${labels_ds} is the segmentation itself: set another connected_dataset")
        }
        file(labels_n5).parent.mkdirs()  // bound into the create-volume container, so it must exist
        [meta, in_n5, in_ds, seg_n5, seg_ds, labels_n5, labels_ds]
    }

    //
    // The labels dataset: uint64, the segmentation's dims, the label chunks (an identical existing one is kept)
    //
    CREATE_VOLUME(
        ch_inputs.map { meta, _in_n5, _in_ds, seg_n5, seg_ds, labels_n5, labels_ds -> [meta, seg_n5, seg_ds, labels_n5, labels_ds] },
        labelsCreateArgs(opts),
    )

    //
    // The blocks, on the labels' chunk grid (write_labels.py writes whole chunks of one block only)
    //
    PLAN_LABEL_BLOCKS(
        CREATE_VOLUME.out.volume.map { meta, _seg_n5, _seg_ds, labels_n5, labels_ds -> [meta, labels_n5, labels_ds] },
        [],  // no model: labels are planned on their chunk grid alone
        labelsPlanArgs(opts),
    )
    // [ id, meta, in_n5, in_ds, seg_n5, seg_ds, labels_n5, labels_ds, records, blocks.txt, blocks ]; the
    // records folder is made once the labels' container exists
    def ch_planned = ch_inputs
        .map { meta, in_n5, in_ds, seg_n5, seg_ds, labels_n5, labels_ds -> [meta.id, meta, in_n5, in_ds, seg_n5, seg_ds, labels_n5, labels_ds] }
        .join(PLAN_LABEL_BLOCKS.out.plan.map { meta, blocks, _jobs -> [meta.id, blocks, planLines(blocks.text)] })
        .map { id, meta, in_n5, in_ds, seg_n5, seg_ds, labels_n5, labels_ds, plan, blocks ->
            [id, meta, in_n5, in_ds, seg_n5, seg_ds, labels_n5, labels_ds, recordsFolder(labels_n5, labels_ds, 'components'), plan, blocks]
        }

    //
    // Label the blocks: each block's objects and faces, into the records folder
    //
    LABEL_BLOCKS(
        ch_planned.flatMap { _id, meta, _in_n5, _in_ds, seg_n5, seg_ds, _labels_n5, _labels_ds, records, _plan, blocks ->
            blockTasks(blocks, opts.blocks_per_task as int).collect { group ->
                [meta + [task: group.task], seg_n5, seg_ds, records, '', group.blocks]
            }
        },
        labelArgs(opts),
        opts.resources,
    )

    //
    // Merge, once all of the volume's label tasks are done: ids, size filter, object table
    //
    MERGE_LABELS(
        whenTasksDone(LABEL_BLOCKS.out.blocks)
            .map { meta, _seg_n5, _seg_ds, _records, _restrict, _blocks -> [meta.id] }
            .join(ch_planned)
            .map { _id, meta, _in_n5, _in_ds, seg_n5, seg_ds, _labels_n5, _labels_ds, records, plan, _blocks -> [meta, seg_n5, seg_ds, records, plan] },
        labelsMergeArgs(opts),
        opts.merge_resources,
    )

    //
    // Write the labels, block by block
    //
    WRITE_LABELS(
        MERGE_LABELS.out.merged
            .map { meta, _seg_n5, _seg_ds, _records -> [meta.id] }
            .join(ch_planned)
            .flatMap { _id, meta, _in_n5, _in_ds, seg_n5, seg_ds, labels_n5, labels_ds, records, _plan, blocks ->
                blockTasks(blocks, opts.blocks_per_task as int).collect { group ->
                    [meta + [task: group.task], seg_n5, seg_ds, labels_n5, labels_ds, [records], group.blocks]
                }
            },
        '',
        opts.resources,
    )

    //
    // Per-volume barrier: the labels are released once all of the volume's write tasks are done
    //
    def ch_labels = whenTasksDone(WRITE_LABELS.out.blocks)
        .map { meta, _seg_n5, _seg_ds, _labels_n5, _labels_ds, _blocks -> [meta.id] }
        .join(ch_planned)
        .map { _id, meta, in_n5, in_ds, _seg_n5, _seg_ds, labels_n5, labels_ds, _records, _plan, _blocks -> [meta, in_n5, in_ds, labels_n5, labels_ds] }

    //
    // Quick look: the input with the labels overlaid, one colour per object
    //
    def ch_pictures = channel.empty()
    if (opts.quicklook) {
        QUICKLOOK(ch_labels.map { meta, in_n5, in_ds, labels_n5, labels_ds -> [meta, in_n5, in_ds, labels_n5, labels_ds, 'labels'] }, opts.quicklook_resources)
        ch_pictures = QUICKLOOK.out.picture
    }

    //
    // Pyramid of the labels (the host's connected_comps_pyramid): mode downsampling, ids never averaged
    //
    def ch_pyramids = channel.empty()
    if (opts.pyramid) {
        PYRAMID(ch_labels.map { meta, _in_n5, _in_ds, labels_n5, labels_ds -> [meta, labels_n5, labels_ds] }, labelsPyramidOptions(opts))
        ch_pyramids = PYRAMID.out.pyramid
    }

    emit:
    labels   = ch_labels                 // channel: [ meta, in_n5, in_dataset, labels_n5, labels_dataset ], one per volume, after its last block
    objects  = MERGE_LABELS.out.objects  // channel: [ meta, objects.csv, objects.json ]: the object table
    summary  = MERGE_LABELS.out.log      // channel: [ meta, merge.log ]: objects, kept, dropped as too small
    pictures = ch_pictures               // channel: [ meta, picture.png ] (none when quicklook is off)
    pyramid  = ch_pyramids               // channel: [ meta, labels_n5, labels_dataset, levels ] (option pyramid)
}

// ------------------------------------------------------------------------------------------------
// Options: the host's connected-components params (names in docs/nextflow.md). No geometry here.
// ------------------------------------------------------------------------------------------------

// The options map with defaults filled in (the host pipeline's defaults), checked.
def componentsOptions(Map options) {
    def defaults = [
        threshold           : 0.8,            // foreground: value >= threshold (connected_pixels_threshold)
        shape               : 'box',          // box (26-connectivity) or diamond (6) (connected_pixels_shape)
        min_size            : 2000,           // objects with fewer voxels are dropped (min_connected_pixels)
        chunks              : '128,128,64',   // chunks of the labels dataset ('' = the segmentation's) (connected_comps_block_size)
        compression         : 'gzip',         // codec of the labels dataset
        overwrite           : false,          // replace a labels dataset of other dims, chunks or dtype
        partition_size      : '512',          // block edge: the segmentation's, rounded up to the label chunks
        partial_volume      : '',             // the segmentation's region ('' = the whole volume)
        blocks_per_task     : 4,              // blocks per labelling and writing task
        resources           : [:],            // [cpus:, memory:, container:] of the per-block tasks
        merge_resources     : [:],            // [cpus:, memory:, container:] of the merge
        quicklook           : true,           // a quick-look picture of the labels
        quicklook_resources : [:],            // [cpus:, memory:, container:] of QUICKLOOK
        pyramid             : false,          // a pyramid of the labels (connected_comps_pyramid)
        pyramid_resolution  : '',             // voxel size x,y,z for the pyramid when s0 records none (resolution)
        pyramid_max_levels  : 10,             // at most this many levels
    ]
    def opts = defaults + options
    def shape = "${opts.shape}".trim()
    if (!['box', 'diamond'].contains(shape)) {
        error("connected_pixels_shape must be 'box' (26-connectivity) or 'diamond' (6), not '${opts.shape}'")
    }
    def minSize = "${opts.min_size}".trim()
    if (!(minSize ==~ /\d+/)) {
        error("min_connected_pixels must be a whole number of voxels, not '${opts.min_size}'")
    }
    def threshold = "${opts.threshold}".trim()
    if (!(threshold ==~ /[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?/)) {
        error("connected_pixels_threshold must be a number, not '${opts.threshold}'")
    }
    def perTask = "${opts.blocks_per_task}".trim()
    if (!(perTask ==~ /\d+/) || perTask.toInteger() < 1) {
        error("blocks_per_task must be a whole number of 1 or more, not '${opts.blocks_per_task}'")
    }
    return opts + [
        quicklook       : componentsFlag(opts.quicklook, 'quicklook'),
        pyramid         : componentsFlag(opts.pyramid, 'connected_comps_pyramid'),
        shape           : shape,
        min_size        : minSize.toInteger(),
        threshold       : threshold,
        blocks_per_task : perTask.toInteger(),
        merge_resources : opts.merge_resources ?: opts.resources,
    ]
}

// A true/false option (a boolean, or its text from a params file), checked.
def componentsFlag(value, String name) {
    def text = "${value}".trim()
    if (!['true', 'false'].contains(text)) {
        error("${name} must be true or false, not '${value}'")
    }
    return text == 'true'
}

// create_volume.py flags of the labels dataset: uint64, the label chunks, the codec.
def labelsCreateArgs(Map opts) {
    return [
        '--dtype uint64',
        opts.chunks ? "--chunks ${sizeText(opts.chunks)}" : '',
        "--compression ${opts.compression}",
        opts.overwrite ? '--overwrite' : '',
    ].findAll { arg -> arg != '' }.join(' ')
}

// plan_blocks.py flags on the labels dataset: the segmentation's block edge and region.
def labelsPlanArgs(Map opts) {
    return [
        "--partition_size ${sizeText(opts.partition_size)}",
        opts.partial_volume ? "--partial_volume ${sizeText(opts.partial_volume)}" : '',
    ].findAll { arg -> arg != '' }.join(' ')
}

// label_blocks.py flags: the threshold (value >= threshold, as the host's Spark app) and the
// neighbourhood (the host's names: box, diamond).
def labelArgs(Map opts) {
    return "--threshold ${opts.threshold} --inclusive --connectivity ${opts.shape}"
}

// merge_labels.py flags: the size filter.
def labelsMergeArgs(Map opts) {
    return "--min-size ${opts.min_size}"
}

// The options of PYRAMID for the labels: level tasks of the components' block edge.
def labelsPyramidOptions(Map opts) {
    return [
        resolution      : opts.pyramid_resolution,
        max_levels      : opts.pyramid_max_levels,
        partition_size  : opts.partition_size,
        blocks_per_task : opts.blocks_per_task,
        overwrite       : opts.overwrite,
    ]
}
