include { PLAN_BLOCKS            } from '../../../modules/local/plan_blocks'
include { SCALING_FACTOR         } from '../../../modules/local/scaling_factor'
include { CREATE_VOLUME          } from '../../../modules/local/create_volume'
include { SEGMENT_VOLUME         } from '../../../modules/local/segment_volume'
include { QUICKLOOK              } from '../../../modules/local/quicklook'
include { GLOBAL_POST_PROCESSING } from '../global_post_processing'
include { PYRAMID                } from '../pyramid'
include { planLines; blockTasks; sizeText; volumeMeta; whenTasksDone; readJson } from '../utils_blocks'

/*
 * Block-wise U-Net segmentation of N5 volumes, up to blocks_per_task blocks per task.
 *
 * For each volume: (1) plan the blocks and the scaling-factor sampling jobs (bin/plan_blocks.py:
 * the chunk grid, partial_volume and the host's arithmetic live in the Python library, not here)
 * and report the run's cost (plan.json, logged; with plan_only nothing runs after it),
 * (2) optionally sample a global intensity scaling factor in parallel jobs and average it,
 * (3) create the output dataset (input dims and chunks), (4) segment the blocks, consecutive ones
 * grouped into tasks (one model load per task), (5) with global post-processing, run it over the
 * whole volume (the blocks were written into a raw sibling dataset; GLOBAL_POST_PROCESSING writes
 * the output dataset), (6) emit the volume as soon as all of its own tasks are done,
 * (7) optionally draw a quick-look picture and build a multiscale pyramid of each segmented volume.
 */
workflow NEURON_SEGMENTATION {

    take:
    ch_volumes  // channel: [ meta, in_n5, in_dataset, out_n5, out_dataset ]  (absolute container paths)
    ch_model    // channel (value): model file (.h5)
    options     // map: see segmentationOptions() for the keys and their defaults

    main:
    def opts = segmentationOptions(options)
    if (opts.scaling_plots_dir && !opts.plan_only) {
        file(opts.scaling_plots_dir).mkdirs()  // bound into the scaling containers, so it must exist
    }
    def ch_inputs = ch_volumes.map { meta, in_n5, in_ds, out_n5, out_ds ->
        if (!opts.plan_only) {
            file(out_n5).parent.mkdirs()  // bound into the create-volume container, so it must exist
        }
        [meta, in_n5, in_ds, out_n5, out_ds]
    }

    //
    // The plan of each volume: its blocks on the chunk grid, its scaling sampling jobs and the
    // run's cost (blocks, voxels to compute, compute time, output size), logged in one line
    //
    PLAN_BLOCKS(ch_inputs.map { meta, in_n5, in_ds, _out_n5, _out_ds -> [meta, in_n5, in_ds] }, ch_model, planArgs(opts))
    def ch_plan = PLAN_BLOCKS.out.plan
        .map { meta, blocks, jobs -> [meta.id, planLines(blocks.text), planLines(jobs.text)] }
    def ch_reports = PLAN_BLOCKS.out.report
    ch_reports.subscribe { meta, report -> log.info(planSummary(meta.id, report.text, opts.plan_only)) }

    def ch_scaling = channel.empty()
    def ch_segmented = channel.empty()
    def ch_pictures = channel.empty()
    def ch_pyramids = channel.empty()
    // plan_only: a dry run, every step after the plan is left out
    if (!opts.plan_only) {
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

        def ch_factors = ch_sampled.mix(ch_fixed)  // [ id, scaling ('' = per-block factor) ]
        ch_scaling = ch_factors

        //
        // The dataset the blocks write: the output, or with global post-processing its raw sibling.
        // Created before any block runs (an identical existing one is kept).
        //
        CREATE_VOLUME(
            ch_inputs.map { meta, in_n5, in_ds, out_n5, out_ds -> [meta, in_n5, in_ds, out_n5, blocksDataset(opts, out_ds)] },
            createArgs(opts),
        )

        //
        // The planned blocks in tasks of up to blocks_per_task consecutive blocks (one model load each)
        //
        def ch_tasks = CREATE_VOLUME.out.volume
            .map { meta, in_n5, in_ds, out_n5, out_ds -> [meta.id, meta, in_n5, in_ds, out_n5, out_ds] }
            .join(ch_factors)
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
        def ch_blocks_written = SEGMENT_VOLUME.out.blocks
            .map { meta, in_n5, in_ds, out_n5, out_ds, _blocks ->
                [groupKey(meta.id, meta.task.count), volumeMeta(meta), in_n5, in_ds, out_n5, out_ds]
            }
            .groupTuple()
            .map { _key, metas, in_n5s, in_dss, out_n5s, out_dss -> [metas[0], in_n5s[0], in_dss[0], out_n5s[0], out_dss[0]] }

        //
        // Global post-processing: hysteresis and small-object removal over the whole raw volume, in
        // the blocks of the same plan, written into the output dataset; the volume is released when
        // its last block of the output is written
        //
        def ch_final = ch_blocks_written
        if (opts.post_processing_mode == 'global') {
            def ch_raw = ch_blocks_written
                .map { meta, _in_n5, _in_ds, out_n5, raw_ds -> [meta.id, meta, out_n5, raw_ds] }
                .join(PLAN_BLOCKS.out.plan.map { meta, blocks, _jobs -> [meta.id, blocks] })
                .join(ch_inputs.map { meta, _in_n5, _in_ds, _out_n5, out_ds -> [meta.id, out_ds] })
                .map { _id, meta, out_n5, raw_ds, blocks, out_ds -> [meta, out_n5, raw_ds, out_n5, out_ds, blocks] }
            GLOBAL_POST_PROCESSING(ch_raw, globalPostProcessingOptions(opts))
            ch_final = GLOBAL_POST_PROCESSING.out.processed
                .map { meta, _raw_n5, _raw_ds, out_n5, out_ds -> [meta.id, meta, out_n5, out_ds] }
                .join(ch_inputs.map { meta, in_n5, in_ds, _out_n5, _out_ds -> [meta.id, in_n5, in_ds] })
                .map { _id, meta, out_n5, out_ds, in_n5, in_ds -> [meta, in_n5, in_ds, out_n5, out_ds] }
        }
        ch_segmented = ch_final

        //
        // Quick look: one picture per segmented volume, its input with the segmentation overlaid
        //
        def ch_looks = channel.empty()
        if (opts.quicklook) {
            QUICKLOOK(ch_final.map { meta, in_n5, in_ds, out_n5, out_ds -> [meta, in_n5, in_ds, out_n5, out_ds, 'auto'] }, opts.quicklook_resources)
            ch_looks = QUICKLOOK.out.picture
        }
        ch_pictures = ch_looks

        //
        // Multiscale pyramid of the probabilities (s1, s2, ... beside the output's s0), level after level
        //
        def ch_levels = channel.empty()
        if (opts.pyramid) {
            PYRAMID(ch_final.map { meta, _in_n5, _in_ds, out_n5, out_ds -> [meta, out_n5, out_ds] }, segmentationPyramidOptions(opts))
            ch_levels = PYRAMID.out.pyramid
        }
        ch_pyramids = ch_levels
    }

    emit:
    segmented = ch_segmented  // channel: [ meta, in_n5, in_dataset, out_n5, out_dataset ], one per volume
    scaling   = ch_scaling    // channel: [ id, scaling factor ('' = each block computes its own) ]
    plan      = ch_reports    // channel: [ meta, plan.json ], the run's cost, one per volume
    pictures  = ch_pictures   // channel: [ meta, picture.png ], one per volume (none when quicklook is off)
    pyramid   = ch_pyramids   // channel: [ meta, out_n5, out_dataset, levels ] once the last level is built (option pyramid)
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
        quicklook                   : true,             // a quick-look picture of each segmented volume
        quicklook_resources         : [:],              // [cpus:, memory:, container:] of QUICKLOOK
        post_processing             : false,            // hysteresis, then small-object removal
        post_processing_scope       : 'block',          // 'block': inside each block (the host's); 'global': over the whole volume
        post_processing_dataset     : '',               // global: the raw dataset the blocks write ('' = rawDataset())
        high_threshold              : 0.98,             // hysteresis seeds: p > high
        low_threshold               : 0.2,              // hysteresis objects: p > low
        small_region_probability_threshold : 0.9,       // small objects: of p > this ...
        small_region_size_threshold : 1000,             // ... with fewer voxels are removed
        components_resources        : [:],              // [cpus:, memory:, container:] of the post-processing passes
        pyramid                     : false,            // a multiscale pyramid of each output (its dataset must be .../s0)
        pyramid_resolution          : '',               // voxel size x,y,z for the pyramid when s0 records none
        pyramid_max_levels          : 10,               // at most this many levels (PYRAMID has this many level steps)
        plan_only                   : false,            // a dry run: plan and report the cost, run nothing after
        rate_mvox_s                 : '',               // segmentation rate of one device for the cost ('' = the script's)
        tile_shape                  : 'auto',           // the tile input shape segmentation runs (for the plan's tile count)
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
    def flags = [
        quicklook       : flag(opts.quicklook, 'quicklook'),
        post_processing : flag(opts.post_processing, 'with_neuron_post_segmentation'),
        pyramid         : flag(opts.pyramid, 'segmentation_pyramid'),
        plan_only       : flag(opts.plan_only, 'plan_only'),
    ]
    def scope = "${opts.post_processing_scope}".trim()
    if (!['block', 'global'].contains(scope)) {
        error("post_processing_scope must be 'block' or 'global', not '${opts.post_processing_scope}'")
    }
    def mode = flags.post_processing ? scope : 'none'
    return opts + flags + [blocks_per_task: perTask.toInteger(), post_processing_mode: mode]
}

// A true/false option (a boolean, or its text from a params file), checked.
def flag(value, String name) {
    def text = "${value}".trim()
    if (!['true', 'false'].contains(text)) {
        error("${name} must be true or false, not '${value}'")
    }
    return text == 'true'
}

// The dataset the blocks write: the output, or with global post-processing the raw sibling the
// passes read (post_processing_dataset, or rawDataset()).
def blocksDataset(Map opts, String outDataset) {
    if (opts.post_processing_mode != 'global') {
        return outDataset
    }
    def raw = "${opts.post_processing_dataset ?: rawDataset(outDataset)}"
    if (raw.tokenize('/') == outDataset.tokenize('/')) {
        error("the raw dataset of global post-processing ${raw} is the output dataset itself: set another post_processing_raw_dataset")
    }
    return raw
}

// The default raw dataset of global post-processing: a sibling group of the output's, e.g.
// /segmented/s0 -> /segmented_raw/s0 (a pyramid of /segmented stays apart), /s0 -> /s0_raw.
def rawDataset(String outDataset) {
    def parts = outDataset.tokenize('/')
    if (parts.size() < 2) {
        return "/${parts ? parts.last() : 's0'}_raw"
    }
    return "/${parts.take(parts.size() - 1).join('/')}_raw/${parts.last()}"
}

// The options of GLOBAL_POST_PROCESSING from the segmentation's.
def globalPostProcessingOptions(Map opts) {
    return opts.subMap([
        'high_threshold', 'low_threshold', 'small_region_probability_threshold', 'small_region_size_threshold',
        'compression', 'overwrite', 'blocks_per_task', 'binary',
    ]) + [resources: opts.components_resources]
}

// The options of PYRAMID from the segmentation's: level tasks of the segmentation's block edge.
def segmentationPyramidOptions(Map opts) {
    return [
        resolution      : opts.pyramid_resolution,
        max_levels      : opts.pyramid_max_levels,
        partition_size  : opts.partition_size,
        blocks_per_task : opts.blocks_per_task,
        overwrite       : opts.overwrite,
    ]
}

// One line for the log from the plan's cost report (plan_blocks.py --report).
def planSummary(String id, String report, boolean planOnly) {
    def cost = readJson(report)
    def seconds = Math.round(cost.compute_seconds as double)
    def line = "plan of ${id}: ${cost.blocks} blocks, ${cost.voxels_to_compute} of ${cost.region_voxels} voxels to compute, " +
        "~${seconds} s (${Math.round(seconds / 36.0) / 100} h) per device at ${cost.rate_mvox_s} Mvox/s, " +
        "output ${cost.output_dtype} ~${Math.round((cost.output_bytes_gzip as double) / 1e6)} MB with gzip" +
        (cost.empty_tiles != null ? "; ${cost.empty_tiles} of ${cost.tile_runs} tiles wholly in empty space" : '')
    return planOnly ? "${line}; plan_only: nothing runs after the plan" : line
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
        opts.binary ? '--as_binary_mask' : '',
        opts.rate_mvox_s ? "--rate-mvox-s ${opts.rate_mvox_s}" : '',
        "--model_input_shape ${sizeText(opts.tile_shape ?: 'auto')}",
        opts.plan_only ? '--plan-only' : '',
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

// segment_volume.py flags: the caller's, per-block post-processing (post_processing_scope 'block'), the region blocks are clipped to (so a block that ends
// inside a chunk at the region's edge is accepted: no other block writes that chunk), the precision
// and constant-tile skipping. The mask is the module's own input (its container is bound).
def segmentArgs(Map opts) {
    return [
        "${opts.segmentation_args}",
        opts.post_processing_mode == 'block' ? '--with_post_processing' : '',
        opts.partial_volume ? "--partial_volume ${sizeText(opts.partial_volume)}" : '',
        "--precision ${opts.precision}",
        opts.skip_constant ? '--skip-constant' : '--no-skip-constant',
    ].findAll { arg -> arg != '' }.join(' ')
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
