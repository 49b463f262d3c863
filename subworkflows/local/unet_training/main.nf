include { PREPARE_DATASET } from '../../../modules/local/prepare_dataset'
include { TRAIN_UNET      } from '../../../modules/local/train_unet'
include { EVALUATE_UNET   } from '../../../modules/local/evaluate_unet'

/*
 * U-Net training on annotated regions, one training run per meta.id.
 *
 * For each run: (1) tile its training regions into an HDF5 dataset of examples (and its held-out
 * regions, if any, into a second one), (2) train the U-Net on the training dataset (a checkpoint
 * per epoch, the best model, CSV log, validation split), (3) evaluate the best model on the
 * held-out dataset, or, without one, on the run's validation examples.
 */
workflow UNET_TRAINING {

    take:
    ch_regions     // channel: [ meta, [ region.h5, ... ] ]  training regions, one item per run (meta.id unique)
    ch_heldout     // channel: [ meta, [ region.h5, ... ] ]  held-out regions of a run (same meta.id), or channel.empty()
    ch_pretrained  // channel (value): model .h5 to fine-tune, or [] for a new model
    options        // map: see trainingOptions() for the keys and their defaults

    main:
    def opts = trainingOptions(options)

    //
    // Datasets: one per run from its training regions, one more from its held-out regions
    //
    def ch_sets = ch_regions.mix(
        ch_heldout.map { meta, regions -> [meta + [id: "${meta.id}_heldout".toString(), heldout_of: meta.id], regions] }
    )
    PREPARE_DATASET(ch_sets, opts.prepare_args)

    def ch_training_sets = PREPARE_DATASET.out.dataset.filter { meta, _h5 -> !meta.heldout_of }
    def ch_heldout_sets = PREPARE_DATASET.out.dataset
        .filter { meta, _h5 -> meta.heldout_of }
        .map { meta, h5 -> [meta.heldout_of, h5] }

    //
    // Training: checkpoints, best model, log and split of each run
    //
    TRAIN_UNET(ch_training_sets, ch_pretrained, opts.train_args)

    //
    // Evaluation of the best model: on the held-out dataset, else on the validation examples
    //
    def ch_evaluation = TRAIN_UNET.out.model
        .join(ch_training_sets)
        .map { meta, model, split, h5 -> [meta.id, meta, model, split, h5] }
        .join(ch_heldout_sets, remainder: true)
        .filter { item -> item[1] != null }  // held-out examples of a run that did not train
        .map { _id, meta, model, split, h5, heldout -> heldout ? [meta, heldout, model, []] : [meta, h5, model, split] }
    EVALUATE_UNET(ch_evaluation, opts.evaluate_args)

    emit:
    dataset     = ch_training_sets          // channel: [ meta, dataset.h5 ]
    model       = TRAIN_UNET.out.model      // channel: [ meta, <id>_best.h5, <id>_split.json ]
    checkpoints = TRAIN_UNET.out.checkpoints // channel: [ meta, <id>/ ] every epoch's checkpoint and resume state, log, plots
    evaluation  = EVALUATE_UNET.out.report  // channel: [ meta, report.json, report.txt ]
}

// ------------------------------------------------------------------------------------------------
// Options: the flags of each stage
// ------------------------------------------------------------------------------------------------

// The options map with defaults filled in (the training scripts' defaults, seed 0), plus the flag
// strings prepare_args, train_args and evaluate_args built from it.
def trainingOptions(Map options) {
    def defaults = [
        raw_dataset           : 't0/channel0',  // raw image dataset in each region file
        label_dataset         : 't0/channel2',  // ground truth dataset (> 0 = neuron)
        model_in_dims         : '220,220,220',  // model (stored example) input x,y,z
        model_out_dims        : '132,132,132',  // model output x,y,z = tile stride
        samples_per_region    : 50,             // examples drawn per region
        above_threshold_ratio : 0.9,            // target share of examples with neurons
        n_blocks              : 2,              // U-Net down/up blocks
        initial_filters       : 4,              // filters of the first convolution
        epochs                : 10,
        batch_size            : 1,
        test_fraction         : 0.2,            // validation fraction
        seed                  : 0,              // example draw, split, initialisation, augmentation
        gpu_mem_growth        : false,          // --set_gpu_mem_growth for training and evaluation
    ]
    def opts = defaults + options
    def in_dims = "${opts.model_in_dims}".replace(' ', '')
    def out_dims = "${opts.model_out_dims}".replace(' ', '')
    def gpu_arg = opts.gpu_mem_growth ? ['--set_gpu_mem_growth'] : []
    opts.prepare_args = [
        "--raw-dataset ${opts.raw_dataset} --label-dataset ${opts.label_dataset}",
        "--tile-input-shape ${in_dims} --tile-output-shape ${out_dims}",
        "--samples-per-region ${opts.samples_per_region} --above-threshold-ratio ${opts.above_threshold_ratio}",
        "--seed ${opts.seed}",
    ].join(' ')
    opts.train_args = ([
        "--model_input_size ${in_dims} --model_output_size ${out_dims}",
        "--n-blocks ${opts.n_blocks} --initial-filters ${opts.initial_filters}",
        "--epochs ${opts.epochs} --batch-size ${opts.batch_size} --test-fraction ${opts.test_fraction}",
        "--seed ${opts.seed}",
    ] + gpu_arg).join(' ')
    opts.evaluate_args = ([
        "--model_input_shape ${in_dims} --model_shape ${out_dims}",
        "--seed ${opts.seed}",
    ] + gpu_arg).join(' ')
    return opts
}
