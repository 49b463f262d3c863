include { BUILD_PYRAMID                      } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S1  } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S2  } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S3  } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S4  } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S5  } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S6  } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S7  } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S8  } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S9  } from '../../../modules/local/build_pyramid'
include { BUILD_PYRAMID as BUILD_PYRAMID_S10 } from '../../../modules/local/build_pyramid'
include { blockTasks; planLines; whenTasksDone; sizeText } from '../utils_blocks'

/*
 * Multiscale pyramids (s1, s2, ... beside <group>/s0) of N5 datasets, block-parallel, level after level.
 *
 * For each dataset: (1) one BUILD_PYRAMID 'create' task creates every level dataset and its
 * multiscale attributes and plans each level's blocks (pyramid/s<k>.txt: build_pyramid.py decides
 * the levels, their factors and blocks; nothing is computed here); (2) for k = 1, 2, ... the blocks
 * of level k, blocks_per_task per task, computed from level k-1: level k starts for a dataset only
 * once all of its level k-1 tasks are done (a groupKey barrier per dataset and level, so datasets do
 * not wait for each other); (3) the dataset is emitted when its last level is done.
 *
 * Nextflow cannot loop over a count known only at run time, so the level steps are the module
 * included under a fixed set of aliases, BUILD_PYRAMID_S1 .. BUILD_PYRAMID_S10; the same
 * --max-levels goes to the script (max_levels, at most 10), so it never plans a level without a step.
 */
workflow PYRAMID {

    take:
    ch_datasets  // channel: [ meta, n5, dataset ]: the full-resolution dataset <group>/s0, meta.id unique per dataset
    options      // map: see pyramidOptions() for the keys and their defaults

    main:
    def opts = pyramidOptions(options)
    def args = pyramidArgs(opts)
    def perTask = opts.blocks_per_task as int

    //
    // Create the levels and plan their blocks
    //
    BUILD_PYRAMID(
        ch_datasets.map { meta, n5, dataset ->
            if (dataset.tokenize('/').last() != 's0') {
                error("a pyramid is built beside a dataset named s0 (<group>/s0), not ${dataset}: name the full-resolution dataset .../s0")
            }
            [meta, n5, dataset, 'create', []]
        },
        args,
    )
    // [ meta, n5, dataset, [ k: [ blocks of level k ] ] ]; no plans: a dataset that fits one chunk has no level
    def ch_levels = BUILD_PYRAMID.out.done
        .map { meta, n5, dataset, _level, _blocks -> [meta.id, meta, n5, dataset] }
        .join(BUILD_PYRAMID.out.plans.map { meta, plans -> [meta.id, levelPlans(plans instanceof List ? plans : [plans])] }, remainder: true)
        .filter { item -> item[1] != null }
        .map { _id, meta, n5, dataset, plans -> [meta, n5, dataset, plans ?: [:]] }

    //
    // The levels, each once all tasks of the one before are done
    //
    BUILD_PYRAMID_S1(levelTasks(ch_levels, 1, perTask), args)
    def ch_s1 = levelBuilt(BUILD_PYRAMID_S1.out.done, ch_levels)
    BUILD_PYRAMID_S2(levelTasks(ch_s1, 2, perTask), args)
    def ch_s2 = levelBuilt(BUILD_PYRAMID_S2.out.done, ch_levels)
    BUILD_PYRAMID_S3(levelTasks(ch_s2, 3, perTask), args)
    def ch_s3 = levelBuilt(BUILD_PYRAMID_S3.out.done, ch_levels)
    BUILD_PYRAMID_S4(levelTasks(ch_s3, 4, perTask), args)
    def ch_s4 = levelBuilt(BUILD_PYRAMID_S4.out.done, ch_levels)
    BUILD_PYRAMID_S5(levelTasks(ch_s4, 5, perTask), args)
    def ch_s5 = levelBuilt(BUILD_PYRAMID_S5.out.done, ch_levels)
    BUILD_PYRAMID_S6(levelTasks(ch_s5, 6, perTask), args)
    def ch_s6 = levelBuilt(BUILD_PYRAMID_S6.out.done, ch_levels)
    BUILD_PYRAMID_S7(levelTasks(ch_s6, 7, perTask), args)
    def ch_s7 = levelBuilt(BUILD_PYRAMID_S7.out.done, ch_levels)
    BUILD_PYRAMID_S8(levelTasks(ch_s7, 8, perTask), args)
    def ch_s8 = levelBuilt(BUILD_PYRAMID_S8.out.done, ch_levels)
    BUILD_PYRAMID_S9(levelTasks(ch_s8, 9, perTask), args)
    def ch_s9 = levelBuilt(BUILD_PYRAMID_S9.out.done, ch_levels)
    BUILD_PYRAMID_S10(levelTasks(ch_s9, 10, perTask), args)
    def ch_s10 = levelBuilt(BUILD_PYRAMID_S10.out.done, ch_levels)

    def ch_pyramids = lastLevel(ch_levels, 0).mix(lastLevel(ch_s1, 1), lastLevel(ch_s2, 2), lastLevel(ch_s3, 3), lastLevel(ch_s4, 4), lastLevel(ch_s5, 5), lastLevel(ch_s6, 6), lastLevel(ch_s7, 7), lastLevel(ch_s8, 8), lastLevel(ch_s9, 9), lastLevel(ch_s10, 10))

    emit:
    pyramid = ch_pyramids  // channel: [ meta, n5, dataset, levels ], once per dataset, after its last level
}

// ------------------------------------------------------------------------------------------------
// Options. The levels, their factors and blocks are planned by bin/build_pyramid.py.
// ------------------------------------------------------------------------------------------------

// The number of level steps (aliases of BUILD_PYRAMID) this subworkflow has.
def maxPyramidLevels() {
    return 10
}

// The options map with defaults filled in, checked.
def pyramidOptions(Map options) {
    def defaults = [
        method          : '',     // downsampling, --method: '' = the script's (max for probabilities, mode for labels)
        resolution      : '',     // voxel size x,y,z (the host's resolution param), used when s0 records none
        max_levels      : maxPyramidLevels(),  // at most this many levels
        partition_size  : '512',  // block edge of a level task, in the level's voxels
        blocks_per_task : 4,      // blocks per level task
        overwrite       : false,  // replace level datasets that differ from the plan
    ]
    def opts = defaults + options
    def levels = "${opts.max_levels}".trim()
    if (!(levels ==~ /\d+/) || levels.toInteger() < 1 || levels.toInteger() > maxPyramidLevels()) {
        error("pyramid_max_levels must be a whole number from 1 to ${maxPyramidLevels()}, not '${opts.max_levels}'")
    }
    return opts + [max_levels: levels.toInteger()]
}

// build_pyramid.py flags, the same for every step of a dataset.
def pyramidArgs(Map opts) {
    return [
        opts.method ? "--method ${opts.method}" : '',
        opts.resolution ? "--resolution ${sizeText(opts.resolution)}" : '',
        "--max-levels ${opts.max_levels}",
        "--partition-size ${sizeText(opts.partition_size)}",
        opts.overwrite ? '--overwrite' : '',
    ].findAll { arg -> arg != '' }.join(' ')
}

// The 'create' task's plans (pyramid/s<k>.txt files) as [ k: [ blocks ] ].
def levelPlans(List plans) {
    def levels = [:]
    plans.each { plan -> levels[plan.baseName.replaceAll(/^s/, '') as int] = planLines(plan.text) }
    return levels
}

// The BUILD_PYRAMID tasks of level k of each dataset: [ meta + task, n5, dataset, 'k', blocks ].
def levelTasks(ch_datasets, int level, int perTask) {
    return ch_datasets.flatMap { meta, n5, dataset, plans ->
        blockTasks(plans[level] ?: [], perTask).collect { group ->
            [meta + [task: group.task], n5, dataset, level.toString(), group.blocks]
        }
    }
}

// Per-dataset barrier after a level: the dataset (with its plans) once all of its tasks of the level are done.
def levelBuilt(ch_done, ch_levels) {
    return whenTasksDone(ch_done)
        .map { meta, _n5, _dataset, _level, _blocks -> [meta.id] }
        .join(ch_levels.map { meta, n5, dataset, plans -> [meta.id, meta, n5, dataset, plans] })
        .map { _id, meta, n5, dataset, plans -> [meta, n5, dataset, plans] }
}

// The datasets whose last level is `level` (0: no level at all), as [ meta, n5, dataset, levels ].
def lastLevel(ch_built, int level) {
    return ch_built
        .filter { _meta, _n5, _dataset, plans -> plans.size() == level }
        .map { meta, n5, dataset, plans -> [meta, n5, dataset, plans.size()] }
}
