include { TIFF_TO_N5           } from '../modules/local/tiff_to_n5'
include { NEURON_SEGMENTATION  } from '../subworkflows/local/neuron_segmentation'
include { CONNECTED_COMPONENTS } from '../subworkflows/local/connected_components'

/*
 * Drop-in for the `neuron_segmentation` workflow of JaneliaSciComp/exllsm-circuit-reconstruction.
 *
 * The host includes it with one line (see docs/nextflow.md):
 *   include { neuron_segmentation } from './external-modules/neuron-segmentation/workflows/neuron_segmentation' addParams(neuron_seg_params)
 *
 * Same inputs, output and params as the host's own workflow: `in` and `out` are Lists or channels
 * of Lists, paired by position; `done` emits [n5_in_dir, n5_in_dataset, out_dir, out_dataset]
 * (the strings as given) once per volume, after all of that volume's blocks are written. An input
 * that is not an N5 (or zarr) dataset is a TIFF series (a folder of slices, or one multi-page
 * TIFF), converted first into <out_dir><unsegmented_dataset>, as the host does; `done` then names
 * that dataset as the input.
 *
 * Connected components: the host's own `with_connected_comps` (default true there) means ITS Spark
 * step, which runs after this workflow and refuses a connected_dataset that already exists. So this
 * workflow never creates connected_dataset (default /connected/s0) unless `neuron_connected_comps`
 * is true (default false): then it runs this project's block-wise components on each segmented
 * volume, with the host's params, and the host's with_connected_comps must be false (docs/nextflow.md).
 */
workflow neuron_segmentation {

    take:
    in   // [ input_dir, input_dataset ]: a List, or a channel of Lists
    out  // [ output_dir, output_dataset, unsegmented_dataset ]: a List, or a channel of Lists

    main:
    if (!nextflow.version.matches(minimumNextflow())) {
        error("Nextflow ${nextflow.version} is too old for the neuron segmentation modules: they need ${minimumNextflow()} (topic channels)")
    }
    if (!params.neuron_model) {
        error("neuron_model is not set: give the U-Net model file (.h5) or its URL")
    }
    def ch_requests = indexed(in)
        .join(indexed(out))
        .map { index, input, output -> hostVolume(index, input, output) }
        .branch { meta ->
            tiff: meta.tiff != ''
            n5: true
        }

    //
    // TIFF input: converted to N5 inside the output container first (the host's tiff_to_n5 step)
    //
    TIFF_TO_N5(
        ch_requests.tiff.map { meta ->
            file(meta.host[0]).parent.mkdirs()  // bound into the container, so it must exist
            [meta, meta.tiff, "${file(meta.host[0])}", meta.host[1]]
        },
        tiffArgs(),
        hostResources('tiff2n5_cpus', 4, 'tiff2n5_memory', '8 GB', ''),
    )
    def ch_converted = TIFF_TO_N5.out.volume.map { meta, n5, dataset -> [meta, n5, dataset] }
    def ch_n5 = ch_requests.n5.map { meta -> [meta, "${file(meta.host[0])}", meta.host[1]] }

    def ch_volumes = ch_n5.mix(ch_converted)
        .map { meta, in_n5, in_ds -> [meta, in_n5, in_ds, "${file(meta.host[2])}", meta.host[3]] }

    NEURON_SEGMENTATION(ch_volumes, channel.value(file(params.neuron_model)), hostOptions())

    done = NEURON_SEGMENTATION.out.segmented.map { meta, _in_n5, _in_ds, _out_n5, _out_ds -> meta.host }

    //
    // This project's connected components, only when neuron_connected_comps asks for them (see above);
    // `done` does not wait for them
    //
    if (ourConnectedComponents()) {
        CONNECTED_COMPONENTS(hostComponentsInput(done), hostComponentsOptions())
    }

    emit:
    done  // channel: [ n5_in_dir, n5_in_dataset, out_dir, out_dataset ], one per volume
}

// The subworkflow's options from the host's params (same names and defaults, except the tile
// shape: 'auto' unless the host sets it).
def hostOptions() {
    // the tile shape the blocks run, which the plan counts too
    def tileShape = hostParam('neuron_seg_model_in_dims', 'auto')
    return [
        partition_size            : hostParam('neuron_segmentation_partition_size', '') ?: hostParam('volume_partition_size', 512),
        partial_volume            : hostParam('partial_volume', ''),
        scaling_tiles             : hostParam('neuron_scaling_tiles', 0),
        scaling_fraction          : hostParam('neuron_percent_scaling_tiles', 0),
        scaling_partition_size    : hostParam('neuron_scaling_partition_size', '396,396,396'),
        max_scaling_tiles_per_job : hostParam('max_scaling_tiles_per_job', 40),
        scaling_plots_dir         : hostParam('neuron_scaling_plots_dir', '') ? "${file(hostParam('neuron_scaling_plots_dir', ''))}" : '',
        user_defined_scaling      : hostParam('user_defined_scaling', ''),
        binary                    : hostParam('neuron_mask_as_binary', false),
        compression               : hostParam('n5_compression', 'gzip'),
        overwrite                 : hostParam('overwrite_output', false),
        blocks_per_task           : hostParam('blocks_per_task', 4),
        precision                 : hostParam('segmentation_precision', 'fp32'),
        mask                      : maskSpec(hostParam('segmentation_mask', '')),
        skip_constant             : hostParam('skip_constant_tiles', true),
        segmentation_resources    : hostResources('neuron_segmentation_cpus', 4, 'neuron_segmentation_memory', '24 GB', hostContainer()),
        scaling_resources         : hostResources('neuron_scaling_cpus', 1, 'neuron_scaling_memory', '4 GB', hostContainer()),
        // Off inside the host unless its params set quicklook: the host does not read conf/modules.config,
        // which publishes the pictures (docs/nextflow.md). The picture stage's image is always the pinned one.
        quicklook                 : hostParam('quicklook', false),
        quicklook_resources       : [cpus: 2, memory: '4 GB', container: ''],
        // The host's per-block post-processing (with_neuron_post_segmentation) unless post_processing_scope
        // says 'global' (standalone runs: nextflow.config): then the blocks go to a raw sibling dataset and
        // the whole volume is post-processed into the output dataset
        post_processing           : hostParam('with_neuron_post_segmentation', false),
        post_processing_scope     : hostParam('post_processing_scope', 'block'),
        post_processing_dataset   : hostParam('post_processing_raw_dataset', ''),
        high_threshold            : hostParam('neuron_seg_high_th', 0.98),
        low_threshold             : hostParam('neuron_seg_low_th', 0.2),
        small_region_probability_threshold : hostParam('neuron_seg_small_region_prob_th', 0.9),
        small_region_size_threshold : hostParam('neuron_seg_small_region_size_th', 1000),
        components_resources      : hostComponentsResources(),
        // A pyramid of the probabilities (new; off unless asked), with the host's voxel size
        pyramid                   : hostParam('segmentation_pyramid', false),
        pyramid_resolution        : hostParam('resolution', '0.104,0.104,0.18'),
        pyramid_max_levels        : hostParam('pyramid_max_levels', 10),
        // The run plan: its cost is always reported; plan_only stops after it (new; off unless asked)
        plan_only                 : hostParam('plan_only', false),
        rate_mvox_s               : hostParam('plan_rate_mvox_s', ''),
        tile_shape                : tileShape,
        segmentation_args         : [
            "--model_input_shape ${tileShape}",
            "--model_output_shape ${hostParam('neuron_seg_model_out_dims', 'auto')}",
            "--unet_batch_size ${hostParam('neuron_seg_unet_batch_sz', 1)}",
            hostParam('use_gpu_mem_growth', true) ? '--set_gpu_mem_growth' : '',
            hostParam('neuron_mask_as_binary', false) ? '--as_binary_mask' : '',
            "--high_threshold ${hostParam('neuron_seg_high_th', 0.98)}",
            "--low_threshold ${hostParam('neuron_seg_low_th', 0.2)}",
            "--small_region_probability_threshold ${hostParam('neuron_seg_small_region_prob_th', 0.9)}",
            "--small_region_size_threshold ${hostParam('neuron_seg_small_region_size_th', 1000)}",
        ].findAll { arg -> arg != '' }.join(' '),
    ]
}

// Whether this workflow runs this project's connected components: only with neuron_connected_comps
// true. Never from the host's with_connected_comps, which means the host's own Spark step.
def ourConnectedComponents() {
    def text = "${hostParam('neuron_connected_comps', false)}".trim()
    if (!['true', 'false'].contains(text)) {
        error("neuron_connected_comps must be true or false, not '${text}'")
    }
    if (text == 'true' && "${hostParam('with_connected_comps', false)}" == 'true') {
        log.warn("neuron_connected_comps and with_connected_comps are both true: inside the host pipeline, its Spark step (with_connected_comps) refuses the connected_dataset this project's components write: set with_connected_comps false there")
    }
    return text == 'true'
}

// CONNECTED_COMPONENTS's input from `done` tuples: [ meta, in_n5, in_ds, seg_n5, seg_ds, labels_n5,
// labels_ds ] per segmented volume (hostComponentsVolume).
def hostComponentsInput(ch_done) {
    return ch_done
        .map { request -> hostComponentsVolume(request) }
        .map { v -> [v.meta, v.in_n5, v.in_ds, v.seg_n5, v.seg_ds, v.labels_n5, v.labels_ds] }
}

// The connected-components request of one segmented volume (a `done` tuple): the labels go to the
// host's connected_dataset in the segmentation's container (where its Spark step writes them);
// meta.id names the labels, as hostVolume names a segmentation.
def hostComponentsVolume(List request) {
    def labels = "${hostParam('connected_dataset', '/connected/s0')}"
    def outDir = "${file(request[2])}"
    def name = "${file(outDir).baseName}${labels}".replaceAll('[^A-Za-z0-9_.-]+', '_')
    return [
        meta      : [id: name],
        in_n5     : "${file(request[0])}",
        in_ds     : request[1],
        seg_n5    : outDir,
        seg_ds    : request[3],
        labels_n5 : outDir,
        labels_ds : labels,
    ]
}

// The components' options from the host's params (same names and defaults as its Spark step).
def hostComponentsOptions() {
    def chunks = params['connected_comps_block_size']  // '' means the segmentation's chunks, as in the host
    return [
        threshold           : hostParam('connected_pixels_threshold', 0.8),
        shape               : hostParam('connected_pixels_shape', 'box'),
        min_size            : hostParam('min_connected_pixels', 2000),
        chunks              : chunks == null ? '128,128,64' : "${chunks}",
        compression         : hostParam('n5_compression', 'gzip'),
        overwrite           : hostParam('overwrite_output', false),
        partition_size      : hostParam('neuron_segmentation_partition_size', '') ?: hostParam('volume_partition_size', 512),
        partial_volume      : hostParam('partial_volume', ''),
        blocks_per_task     : hostParam('blocks_per_task', 4),
        resources           : hostComponentsResources(),
        merge_resources     : hostComponentsResources(),
        quicklook           : hostParam('quicklook', false),
        quicklook_resources : [cpus: 2, memory: '4 GB', container: ''],
        pyramid             : hostParam('connected_comps_pyramid', false),
        pyramid_resolution  : hostParam('resolution', '0.104,0.104,0.18'),
        pyramid_max_levels  : hostParam('pyramid_max_levels', 10),
    ]
}

// [cpus, memory, container] of the components' and global post-processing's tasks: memory for one
// block (its values, foreground and labels), images pinned.
def hostComponentsResources() {
    return [cpus: 2, memory: '8 GB', container: '']
}

// The tissue mask 'container:dataset' with the container as an absolute path (the tasks run in
// their work directories, and the container is bound into theirs); '' for none. Split at the last
// colon, as segment_volume.py splits it.
def maskSpec(spec) {
    def text = "${spec ?: ''}".trim()
    if (!text) {
        return ''
    }
    def colon = text.lastIndexOf(':')
    if (colon < 1 || colon == text.length() - 1) {
        error("segmentation_mask '${text}' is not CONTAINER:DATASET (e.g. /data/mask.n5:/mask/s0)")
    }
    return "${file(text.substring(0, colon))}:${text.substring(colon + 1)}"
}

// The oldest Nextflow that runs these modules: topic channels (the `versions` outputs) are
// generally available from 25.04. The host's v1-parser code (addParams) runs on 25.04 to 25.10 as
// it is, and on 26.04 or later with NXF_SYNTAX_PARSER=v1 (docs/nextflow.md). Also in the manifest.
def minimumNextflow() {
    return '>=25.04.0'
}

// tiff_to_n5.py flags from the host's params: slice pattern, chunk size, region, codec.
def tiffArgs() {
    def pattern = hostParam('input_imgname_pattern', '*.tif')
    def chunks = "${hostParam('block_size', '512,512,512')}".replace(' ', '')
    def region = "${hostParam('partial_volume', '')}".replace(' ', '')
    return [
        "--input_name_pattern '${pattern}'",
        "--chunks ${chunks}",
        region ? "--subvol ${region}" : '',
        "--compression ${hostParam('n5_compression', 'gzip')}",
        hostParam('overwrite_output', false) ? '--overwrite' : '',
    ].findAll { arg -> arg != '' }.join(' ')
}

// [cpus, memory, container] of a stage from the host's resource params.
def hostResources(String cpusParam, int cpus, String memoryParam, String memory, String container) {
    return [cpus: hostParam(cpusParam, cpus) as int, memory: "${hostParam(memoryParam, memory)}", container: container]
}

// The image of the segmentation and scaling stages: exm_neuron_segmentation_container when set.
// The host fills it in with the original tool's image (neuron-segmentation:1.0.0) when the user
// leaves it empty; that image has none of these stages' scripts, so it means "not set" here.
def hostContainer() {
    def image = "${hostParam('exm_neuron_segmentation_container', '')}"
    if (image ==~ /.*\/neuron-segmentation:1\.0\.0$/) {
        log.warn("exm_neuron_segmentation_container ${image} is the original tool's image, which cannot run these stages: using the pinned exllsm images")
        return ''
    }
    return image
}

// A host param, or its default in the host pipeline when the param is absent or empty.
def hostParam(String name, defaultValue) {
    def value = params[name]
    return value == null || value == '' ? defaultValue : value
}

// [index, item] pairs of a List (one item) or of a channel's items, like the host's index_channel.
def indexed(source) {
    return numbered(source instanceof List ? channel.of(source) : source)
}

def numbered(items) {
    return items.toList().flatMap { all -> (0..<all.size()).collect { index -> [index, all[index]] } }
}

// The meta map of one host request: meta.host keeps the strings `done` emits; meta.tiff is the
// TIFF input to convert ('' for an N5 or zarr input).
def hostVolume(index, List input, List output) {
    def inDir = input[0]
    def inDataset = input[1] ?: ''
    def outDir = output[0]
    def outDataset = output[1]
    def name = "${file(outDir).baseName}${outDataset}".replaceAll('[^A-Za-z0-9_.-]+', '_')
    def id = index ? [name, "${index}"].join('-') : name
    def source = file("${inDir}/${inDataset}")
    def target = file("${outDir}/${outDataset}")
    if (isDataset(source)) {
        if (source == target) {
            error("the output ${outDir}:${outDataset} is the input dataset itself: set another neuron_output_dataset (or output_dir)")
        }
        return [id: id, tiff: '', host: [inDir, inDataset, outDir, outDataset]]
    }
    if (source.resolve('attributes.json').exists()) {
        error("${source} is an N5 container or group, not a dataset (its attributes.json has no dimensions): set the input dataset, e.g. --neuron_input_dataset /c1/s0")
    }
    if (!source.exists()) {
        error("${source} does not exist: neuron_stack_dir/neuron_input_dataset must be an N5 or zarr dataset, a folder of TIFF slices or a multi-page TIFF")
    }
    // The host's rule: anything that is not an N5 dataset is a TIFF series, converted into
    // <output_dir><unsegmented_dataset> (default_n5_dataset when that is empty)
    def rawDataset = output.size() > 2 && output[2] ? output[2] : hostParam('default_n5_dataset', 's0')
    if (file("${outDir}/${rawDataset}") == target) {
        error("the converted TIFF input ${outDir}:${rawDataset} would be the output dataset ${outDataset} itself: set another unsegmented_dataset (or neuron_output_dataset)")
    }
    return [id: id, tiff: "${source}", host: [outDir, rawDataset, outDir, outDataset]]
}

// Whether a directory holds an N5 dataset (attributes.json with top-level dimensions) or a zarr array.
def isDataset(Path dir) {
    def n5 = dir.resolve('attributes.json')
    return dir.resolve('.zarray').exists() || (n5.exists() && parseJson(new groovy.json.JsonSlurper(), n5.text).dimensions != null)
}

// `parser` is untyped on purpose: the type checker knows no JsonSlurper methods.
def parseJson(parser, String text) {
    return parser.parseText(text)
}
