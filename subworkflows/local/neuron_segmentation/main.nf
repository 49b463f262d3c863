include { SCALING_FACTOR } from '../../../modules/local/scaling_factor'
include { CREATE_VOLUME  } from '../../../modules/local/create_volume'
include { SEGMENT_VOLUME } from '../../../modules/local/segment_volume'

/*
 * Block-wise U-Net segmentation of N5 volumes, one task per block.
 *
 * For each volume: (1) optionally sample a global intensity scaling factor in parallel jobs and
 * average it, (2) create the output dataset (input dims and chunks), (3) cut the processed
 * region into blocks aligned to the output chunk grid, (4) segment each block, (5) emit the
 * volume as soon as all of its own blocks are done.
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

    //
    // Input geometry: dims and chunks of each input dataset (N5 attributes.json or zarr .zarray)
    //
    def ch_info = ch_volumes.map { meta, in_n5, in_ds, out_n5, out_ds ->
        def attrs = datasetGeometry(in_n5, in_ds)
        def region = processedRegion(attrs.dims, opts.partial_volume)
        checkAlignment(meta.id, region, attrs.chunks, opts.partition_size)
        file(out_n5).parent.mkdirs()  // bound into the create-volume container, so it must exist
        [meta + [dims: attrs.dims, chunks: attrs.chunks], in_n5, in_ds, out_n5, out_ds]
    }

    //
    // Global scaling factor: sampling jobs in parallel, then the mean of the jobs' factors
    //
    def ch_jobs = ch_info.flatMap { meta, in_n5, in_ds, _out_n5, _out_ds ->
        def plan = scalingPlan(meta.dims, opts)
        plan.jobs.collect { job ->
            [meta + [job: [index: job.index, count: plan.jobs.size()]], in_n5, in_ds, job.start, job.end, plan.fraction]
        }
    }
    SCALING_FACTOR(ch_jobs, opts.scaling_partition_size.join(','), opts.scaling_plots_dir)

    def ch_sampled = SCALING_FACTOR.out.scaling
        .map { meta, value -> [groupKey(meta.id, meta.job.count), meta.id, value] }
        .groupTuple()
        .map { _key, ids, values -> [ids[0], meanScaling(values)] }

    def ch_fixed = ch_info
        .filter { meta, _in_n5, _in_ds, _out_n5, _out_ds -> scalingPlan(meta.dims, opts).jobs.isEmpty() }
        .map { meta, _in_n5, _in_ds, _out_n5, _out_ds -> [meta.id, normaliseScaling(opts.user_defined_scaling)] }

    def ch_scaling = ch_sampled.mix(ch_fixed)  // [ id, scaling ('' = per-block factor) ]

    //
    // Output dataset: created before any block runs (an identical existing one is kept)
    //
    CREATE_VOLUME(ch_info, opts.binary ? 'uint8' : 'float32')

    //
    // One task per block; blocks are aligned to the output chunk grid
    //
    def ch_blocks = CREATE_VOLUME.out.volume
        .map { meta, in_n5, in_ds, out_n5, out_ds -> [meta.id, meta, in_n5, in_ds, out_n5, out_ds] }
        .join(ch_scaling)
        .flatMap { _id, meta, in_n5, in_ds, out_n5, out_ds, scaling ->
            def blocks = partitionVolume(meta.dims, opts.partial_volume, opts.partition_size, meta.chunks)
            blocks.collect { block ->
                def block_meta = meta + [scaling: scaling, block: [index: block.index, count: blocks.size(), unaligned: block.unaligned]]
                [block_meta, in_n5, in_ds, out_n5, out_ds, block.start, block.end, scaling]
            }
        }
    SEGMENT_VOLUME(ch_blocks, ch_model, opts.segmentation_args)

    //
    // Per-volume barrier: each volume is released as soon as its own blocks are all done
    //
    def ch_segmented = SEGMENT_VOLUME.out.block
        .map { meta, in_n5, in_ds, out_n5, out_ds, _start, _end ->
            [groupKey(meta.id, meta.block.count), meta.findAll { key, _value -> key != 'block' }, in_n5, in_ds, out_n5, out_ds]
        }
        .groupTuple()
        .map { _key, metas, in_n5s, in_dss, out_n5s, out_dss -> [metas[0], in_n5s[0], in_dss[0], out_n5s[0], out_dss[0]] }

    emit:
    segmented = ch_segmented  // channel: [ meta, in_n5, in_dataset, out_n5, out_dataset ], one per volume
    scaling   = ch_scaling    // channel: [ id, scaling factor ('' = each block computes its own) ]
}

// ------------------------------------------------------------------------------------------------
// Options and geometry. Coordinates are x,y,z with exclusive ends, as in the host pipeline.
// ------------------------------------------------------------------------------------------------

// The options map with defaults filled in (the host pipeline's defaults).
def segmentationOptions(Map options) {
    def defaults = [
        partition_size              : [512, 512, 512],  // GPU block edge(s): a multiple of the output chunk size
        partial_volume              : '',               // 'x0,y0,z0,dx,dy,dz' or '' for the whole volume
        scaling_tiles               : 0,                // number of sampled tiles (wins over the fraction)
        scaling_fraction            : 0,                // fraction of sampled tiles, used when 0 < f < 1
        scaling_partition_size      : [396, 396, 396],  // sampling tile size
        max_scaling_tiles_per_job   : 40,
        scaling_plots_dir           : '',
        user_defined_scaling        : '',               // used as-is when no sampling runs
        binary                      : false,            // uint8 0/1 output instead of float32 probabilities
        segmentation_args           : '',               // extra segment_volume.py flags
    ]
    def opts = defaults + options
    opts.partition_size = sizeComponents(opts.partition_size)
    opts.scaling_partition_size = sizeComponents(opts.scaling_partition_size)
    return opts
}

// A size given as a number, an 'x,y,z' string or a list, as a list of three ints.
def sizeComponents(value) {
    def text = "${value}".replace('[', '').replace(']', '')
    def sizes = text.tokenize(',').collect { part -> part.trim().toInteger() }.toList()
    if (sizes.size() == 1) {
        sizes = [sizes[0], sizes[0], sizes[0]]
    }
    if (sizes.size() != 3 || sizes.any { size -> size < 1 }) {
        error("size '${text}' must be one positive integer or three (x,y,z)")
    }
    return sizes
}

// dims and chunks (x,y,z) of a dataset: N5 attributes.json, or zarr .zarray (stored z,y,x).
def datasetGeometry(container, dataset) {
    def dir = file("${container}/${dataset}")
    def n5 = dir.resolve('attributes.json')
    def zarr = dir.resolve('.zarray')
    if (n5.exists()) {
        def attrs = jsonObject(n5)
        if (!attrs.dimensions || !attrs.blockSize) {
            error("${n5} has no dimensions/blockSize: '${dataset}' is not a dataset of ${container} (set the input dataset, e.g. /c1/s0)")
        }
        return [dims: sizeComponents(attrs.dimensions), chunks: sizeComponents(attrs.blockSize)]
    }
    if (zarr.exists()) {
        def attrs = jsonObject(zarr)
        return [dims: sizeComponents(attrs.shape).reverse(), chunks: sizeComponents(attrs.chunks).reverse()]
    }
    error("no N5 or zarr dataset at ${dir} (neither attributes.json nor .zarray)")
}

// The JSON object in a file, as a map.
def jsonObject(Path json) {
    return parseJson(new groovy.json.JsonSlurper(), json.text)
}

// `parser` is untyped on purpose: the type checker knows no JsonSlurper methods.
def parseJson(parser, String text) {
    return parser.parseText(text)
}

// The processed region [origin, size] of a volume: all of it, or partial_volume clipped to it.
def processedRegion(List dims, String partialVolume) {
    if (!partialVolume) {
        return [origin: [0, 0, 0], size: dims]
    }
    def values = partialVolume.tokenize(',').collect { v -> v.trim() as int }
    if (values.size() != 6) {
        error("partial_volume '${partialVolume}' must be 'x0,y0,z0,dx,dy,dz'")
    }
    def origin = values[0..2]
    (0..2).each { axis ->
        if (origin[axis] < 0 || origin[axis] >= dims[axis]) {
            error("partial_volume '${partialVolume}' starts outside the volume ${dims.join(',')}")
        }
    }
    def size = (0..2).collect { axis -> Math.min(values[axis + 3], dims[axis] - origin[axis]) }
    return [origin: origin, size: size]
}

// Refuse a partition the output chunk grid cannot take without two blocks sharing a chunk.
def checkAlignment(id, Map region, List chunks, List partition) {
    (0..2).each { axis ->
        def name = 'xyz'[axis]
        if (partition[axis] % chunks[axis] != 0) {
            error("${id}: partition size ${partition.join(',')} is not a multiple of the output chunk size ${chunks.join(',')} on axis ${name}; parallel blocks would share chunks and lose writes. Use a multiple of ${chunks[axis]} (neuron_segmentation_partition_size / volume_partition_size)")
        }
        if (region.origin[axis] % chunks[axis] != 0) {
            error("${id}: partial_volume starts at ${region.origin.join(',')}, which is not on the chunk grid ${chunks.join(',')} on axis ${name}; start it at a multiple of ${chunks[axis]}")
        }
    }
}

// The blocks [index, start, end, unaligned] covering the region, x fastest (the host's order).
def partitionVolume(List dims, String partialVolume, List partition, List chunks) {
    def region = processedRegion(dims, partialVolume)
    // per axis, the [start, end) intervals of the blocks
    def intervals = [0, 1, 2].collect { axis ->
        def origin = region.origin[axis] as Integer
        def stop = origin + (region.size[axis] as Integer)
        def step = partition[axis] as Integer
        def count = (stop - origin + step - 1).intdiv(step)
        (0..<count).collect { i -> [origin + i * step, Math.min(origin + (i + 1) * step, stop)] }.toList()
    }.toList()
    def boxes = intervals[2].collectMany { z -> intervals[1].collectMany { y -> intervals[0].collect { x -> [x, y, z] } } }.toList()
    return (0..<boxes.size()).collect { index ->
        def box = boxes[index]
        // A block may end off the chunk grid only where the region ends inside the volume; that
        // last chunk belongs to this block alone, so writing it is still race-free.
        def unaligned = [0, 1, 2].any { axis -> box[axis][1] % chunks[axis] != 0 && box[axis][1] != dims[axis] }
        [index: index, start: box.collect { iv -> iv[0] }.join(','), end: box.collect { iv -> iv[1] }.join(','), unaligned: unaligned]
    }.toList()
}

// The sampling jobs of one volume (the host's neuron_scaling_factor arithmetic); none when inactive.
def scalingPlan(List dims, Map opts) {
    def tiles = opts.scaling_tiles as int
    def fraction = opts.scaling_fraction as double
    if (!(tiles > 0 || (fraction > 0 && fraction < 1))) {
        return [fraction: 0, jobs: []]
    }
    def tile = opts.scaling_partition_size
    def nTiles = partitionVolume(dims, opts.partial_volume, tile, tile).size()
    def pct = tiles > 0 ? (tiles as double) / (nTiles as double) : fraction
    def edge = (tile.min() * Math.cbrt((opts.max_scaling_tiles_per_job as double) / pct)) as int
    def jobs = partitionVolume(dims, opts.partial_volume, [edge, edge, edge], [1, 1, 1])
    return [fraction: pct, jobs: jobs]
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
