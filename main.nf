#!/usr/bin/env nextflow
/*
 * exllsm-neuronseg: block-wise 3D U-Net neuron segmentation of ExLLSM N5 volumes, and training of
 * the U-Net on annotated regions.
 *
 *   nextflow run main.nf -profile test,docker                       # synthetic volume, published model
 *   nextflow run main.nf -profile docker,gpu --neuron_stack_dir /data/sample.n5 \
 *       --neuron_input_dataset /c1/s0 --output_dir /data/sample-seg.n5 --neuron_model /models/neuron_2021.h5
 *
 *   nextflow run main.nf -profile test,docker --plan_only            # the plan and its cost, nothing else
 *
 *   nextflow run main.nf -profile test_training,docker              # synthetic regions, small model
 *   nextflow run main.nf -profile docker,gpu --workflow training \
 *       --training_regions '/data/regions/*.h5' --training_heldout_regions /data/heldout/H1.h5
 *
 * Params use the ExLLSM circuit-reconstruction pipeline's names (nextflow_schema.json); segmentation
 * goes through the same `neuron_segmentation` workflow the host pipeline includes.
 */

include { validateParameters; paramsSummaryLog } from 'plugin/nf-schema'
include { MAKE_TEST_VOLUME                     } from './modules/local/make_test_volume'
include { MAKE_TRAINING_REGIONS                } from './modules/local/make_training_regions'
include { neuron_segmentation                  } from './workflows/neuron_segmentation'
include { hostComponentsInput; hostComponentsOptions } from './workflows/neuron_segmentation'
include { CONNECTED_COMPONENTS                 } from './subworkflows/local/connected_components'
include { UNET_TRAINING                        } from './subworkflows/local/unet_training'

workflow {

    main:
    if (params.validate_params) {
        validateParameters()
    }
    log.info(paramsSummaryLog(workflow))

    if (params.workflow == 'segmentation') {
        if (!params.neuron_stack_dir || !params.output_dir) {
            error("set --neuron_stack_dir (input N5 container, TIFF folder or multi-page TIFF) and --output_dir (output N5 container), or run -profile test")
        }
        def input_n5 = "${file(params.neuron_stack_dir)}"
        def output_n5 = "${file(params.output_dir)}"

        //
        // Input: the given N5 dataset, or (test profile) a synthetic volume written there first
        //
        def ch_input = channel.of([input_n5, params.neuron_input_dataset])
        if (params.test_volume) {
            file(input_n5).parent.mkdirs()  // bound into the container, so it must exist
            MAKE_TEST_VOLUME(
                channel.of([[id: 'test_volume'], input_n5, params.neuron_input_dataset]),
                params.test_volume_shape,
                params.test_volume_chunks,
            )
            ch_input = MAKE_TEST_VOLUME.out.volume.map { _meta, n5, dataset -> [n5, dataset] }
        }

        neuron_segmentation(ch_input, [output_n5, params.neuron_output_dataset, params.unsegmented_dataset])

        neuron_segmentation.out.done.subscribe { in_n5, in_ds, out_n5, out_ds ->
            log.info("segmented ${in_n5}:${in_ds} -> ${out_n5}:${out_ds}")
        }

        //
        // Connected components of each segmented volume (the host's with_connected_comps, default
        // true, and its params): this project's block-wise stages stand in for the host's Spark step,
        // into the same connected_dataset. With neuron_connected_comps (the switch a host user sets)
        // the facade runs them itself, so they never run twice; plan_only runs nothing after the plan.
        //
        if (params.with_connected_comps && !params.neuron_connected_comps && !params.plan_only) {
            CONNECTED_COMPONENTS(hostComponentsInput(neuron_segmentation.out.done), hostComponentsOptions())
            CONNECTED_COMPONENTS.out.labels.subscribe { meta, _in_n5, _in_ds, labels_n5, labels_ds ->
                log.info("connected components ${labels_n5}:${labels_ds}; object table in ${params.outdir}/components/${meta.id}")
            }
        }
    }
    else if (params.workflow == 'training') {
        //
        // Training: regions -> dataset -> trained model -> evaluation, published to <outdir>/training.
        // Regions: the given HDF5 files, or (test_training profile) synthetic regions made first.
        //
        def run = [id: params.training_model_name]
        def ch_regions = channel.empty()
        def ch_heldout = channel.empty()
        if (params.test_regions) {
            def heldout = "${params.test_heldout_region_names ?: ''}".tokenize(',')
            MAKE_TRAINING_REGIONS(
                channel.of([[id: 'test_regions'], ([params.test_region_names] + heldout).join(',')]),
                params.test_region_shape,
                "--raw-dataset ${params.training_raw_dataset} --label-dataset ${params.training_label_dataset}",
            )
            ch_regions = MAKE_TRAINING_REGIONS.out.regions
                .map { _meta, files -> [run, files.findAll { region -> !heldout.contains(region.baseName) }] }
            ch_heldout = MAKE_TRAINING_REGIONS.out.regions
                .map { _meta, files -> [run, files.findAll { region -> heldout.contains(region.baseName) }] }
                .filter { _meta, files -> files }
        }
        else {
            if (!params.training_regions) {
                error("set --training_regions (region HDF5 files, e.g. '/data/regions/*.h5'), or run -profile test_training")
            }
            ch_regions = channel.fromPath(params.training_regions, checkIfExists: true).collect().map { files -> [run, files] }
            if (params.training_heldout_regions) {
                ch_heldout = channel.fromPath(params.training_heldout_regions, checkIfExists: true).collect().map { files -> [run, files] }
            }
        }
        def ch_pretrained = channel.value(params.training_pretrained_model ? file(params.training_pretrained_model) : [])

        UNET_TRAINING(ch_regions, ch_heldout, ch_pretrained, [
            raw_dataset           : params.training_raw_dataset,
            label_dataset         : params.training_label_dataset,
            model_in_dims         : params.training_model_in_dims,
            model_out_dims        : params.training_model_out_dims,
            samples_per_region    : params.training_samples_per_region,
            above_threshold_ratio : params.training_above_threshold_ratio,
            n_blocks              : params.training_n_blocks,
            initial_filters       : params.training_initial_filters,
            epochs                : params.training_epochs,
            batch_size            : params.training_batch_size,
            test_fraction         : params.training_test_fraction,
            seed                  : params.training_seed,
            gpu_mem_growth        : params.use_gpu_mem_growth,
        ])

        UNET_TRAINING.out.evaluation.subscribe { meta, _json, _txt ->
            log.info("trained ${meta.id}: model, checkpoints and evaluation in ${params.outdir}/training/${meta.id}")
        }
    }
    else {
        error("--workflow must be 'segmentation' or 'training', not '${params.workflow}'")
    }

    //
    // Tool versions of every task, collected from the `versions` topic
    //
    channel.topic('versions')
        .unique()
        .map { process, tool, version -> "${process.tokenize(':').last()}:\n  ${tool}: ${version}\n" }
        .collectFile(name: 'versions.yml', storeDir: "${params.outdir}/pipeline_info", sort: true)
}
