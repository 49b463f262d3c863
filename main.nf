#!/usr/bin/env nextflow
/*
 * exllsm-neuronseg: block-wise 3D U-Net neuron segmentation of ExLLSM N5 volumes.
 *
 *   nextflow run main.nf -profile test,docker                       # synthetic volume, published model
 *   nextflow run main.nf -profile docker,gpu --neuron_stack_dir /data/sample.n5 \
 *       --neuron_input_dataset /c1/s0 --output_dir /data/sample-seg.n5 --neuron_model /models/neuron_2021.h5
 *
 * Params use the ExLLSM circuit-reconstruction pipeline's names (nextflow_schema.json); the run goes
 * through the same `neuron_segmentation` workflow the host pipeline includes.
 */

include { validateParameters; paramsSummaryLog } from 'plugin/nf-schema'
include { MAKE_TEST_VOLUME                     } from './modules/local/make_test_volume'
include { neuron_segmentation                  } from './workflows/neuron_segmentation'

workflow {

    main:
    if (params.validate_params) {
        validateParameters()
    }
    log.info(paramsSummaryLog(workflow))

    if (!params.neuron_stack_dir || !params.output_dir) {
        error("set --neuron_stack_dir (input N5 container) and --output_dir (output N5 container), or run -profile test")
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
    // Tool versions of every task, collected from the `versions` topic
    //
    channel.topic('versions')
        .unique()
        .map { process, tool, version -> "${process.tokenize(':').last()}:\n  ${tool}: ${version}\n" }
        .collectFile(name: 'versions.yml', storeDir: "${params.outdir}/pipeline_info", sort: true)
}
