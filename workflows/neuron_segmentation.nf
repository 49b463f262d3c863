include { NEURON_SEGMENTATION } from '../subworkflows/local/neuron_segmentation'

/*
 * Drop-in for the `neuron_segmentation` workflow of JaneliaSciComp/exllsm-circuit-reconstruction.
 *
 * The host includes it with one line (see docs/nextflow.md):
 *   include { neuron_segmentation } from './external-modules/neuron-segmentation/workflows/neuron_segmentation' addParams(neuron_seg_params)
 *
 * Same inputs, output and params as the host's own workflow: `in` and `out` are Lists or channels
 * of Lists, paired by position; `done` emits [n5_in_dir, n5_in_dataset, out_dir, out_dataset]
 * (the strings as given) once per volume, after all of that volume's blocks are written. Inputs
 * must already be N5 (or zarr) datasets.
 */
workflow neuron_segmentation {

    take:
    in   // [ input_dir, input_dataset ]: a List, or a channel of Lists
    out  // [ output_dir, output_dataset, unsegmented_dataset ]: a List, or a channel of Lists

    main:
    if (!params.neuron_model) {
        error("neuron_model is not set: give the U-Net model file (.h5) or its URL")
    }
    def ch_volumes = indexed(in)
        .join(indexed(out))
        .map { index, input, output ->
            def meta = hostVolume(index, input, output)
            [meta, "${file(meta.host[0])}", meta.host[1], "${file(meta.host[2])}", meta.host[3]]
        }

    NEURON_SEGMENTATION(ch_volumes, channel.value(file(params.neuron_model)), hostOptions())

    done = NEURON_SEGMENTATION.out.segmented.map { meta, _in_n5, _in_ds, _out_n5, _out_ds -> meta.host }

    emit:
    done  // channel: [ n5_in_dir, n5_in_dataset, out_dir, out_dataset ], one per volume
}

// The subworkflow's options from the host's params (same names and defaults, except the tile
// shape: 'auto' unless the host sets it).
def hostOptions() {
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
        segmentation_args         : [
            "--model_input_shape ${hostParam('neuron_seg_model_in_dims', 'auto')}",
            "--model_output_shape ${hostParam('neuron_seg_model_out_dims', 'auto')}",
            "--unet_batch_size ${hostParam('neuron_seg_unet_batch_sz', 1)}",
            hostParam('use_gpu_mem_growth', true) ? '--set_gpu_mem_growth' : '',
            hostParam('neuron_mask_as_binary', false) ? '--as_binary_mask' : '',
            hostParam('with_neuron_post_segmentation', false) ? '--with_post_processing' : '',
            "--high_threshold ${hostParam('neuron_seg_high_th', 0.98)}",
            "--low_threshold ${hostParam('neuron_seg_low_th', 0.2)}",
            "--small_region_probability_threshold ${hostParam('neuron_seg_small_region_prob_th', 0.9)}",
            "--small_region_size_threshold ${hostParam('neuron_seg_small_region_size_th', 1000)}",
        ].findAll { arg -> arg != '' }.join(' '),
    ]
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

// The meta map of one host request; meta.host keeps the request's strings for `done`.
def hostVolume(index, List input, List output) {
    def inDir = input[0]
    def inDataset = input[1] ?: ''
    def outDir = output[0]
    def outDataset = output[1]
    // The host's rule: an input with <dir>/<dataset>/attributes.json is N5, anything else is a TIFF series
    if (!file("${inDir}/${inDataset}/attributes.json").exists()) {
        error("${inDir}/${inDataset} is not an N5 dataset (no attributes.json): convert TIFF input to N5 first, e.g. with the host's tiff_to_n5 step")
    }
    def name = "${file(outDir).baseName}${outDataset}".replaceAll('[^A-Za-z0-9_.-]+', '_')
    return [
        id  : index ? [name, "${index}"].join('-') : name,
        host: [inDir, inDataset, outDir, outDataset],
    ]
}
