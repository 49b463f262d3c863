/*
 * Channel helpers shared by the block-wise subworkflows (segmentation, global post-processing,
 * connected components, pyramids). No geometry: blocks come from plan files written by the
 * scripts (plan_blocks.py's blocks.txt, build_pyramid.py's s<k>.txt); these functions only read
 * their lines, cut a plan's list into tasks and wait for a volume's tasks.
 */

// The lines of a plan file: 'x0,y0,z0,x1,y1,z1' (blocks) or 'x0,y0,z0,x1,y1,z1 fraction' (scaling jobs).
def planLines(String text) {
    return text.readLines().findAll { line -> line.trim() }.collect { line ->
        def fields = line.trim().tokenize(' ')
        def box = fields[0].tokenize(',')
        [start: box[0..2].join(','), end: box[3..5].join(','), fraction: fields.size() > 1 ? fields[1] : '']
    }
}

// A volume's planned blocks (planLines) as tasks of up to `perTask` consecutive blocks, in plan
// order; the last task may be shorter. Per task: [ task: [ index:, count:, range: 'first-last'
// (plan indices, as the scripts' --block-index takes them), volume_blocks: ], blocks: [ [start:,
// end:], ... ] ]. Only indices are grouped: no geometry.
def blockTasks(List blocks, int perTask) {
    def groups = blocks.collate(perTask)
    return groups.withIndex().collect { group, index ->
        def first = index * perTask
        def last = first + group.size() - 1
        [
            task   : [index: index, count: groups.size(), range: [first, last].unique().join('-'), volume_blocks: blocks.size()],
            blocks : group.collect { block -> [start: block.start, end: block.end] },
        ]
    }
}

// A size given as a number, an 'x,y,z' string or a list, as the 'x,y,z' (or 'n') text the scripts take.
def sizeText(value) {
    return "${value}".replace('[', '').replace(']', '').replace(' ', '')
}

// The meta map without its task (what a volume's tasks have in common).
def volumeMeta(Map meta) {
    return meta.findAll { key, _value -> key != 'task' }
}

// Per-volume barrier on the outputs of a volume's tasks ([ meta (with task: [count:]), ... ]):
// each volume is released once, as soon as its own tasks are all done (groupKey with the task
// count), without waiting for other volumes. Emits the first task's item with the task dropped
// from its meta.
def whenTasksDone(ch_tasks) {
    return ch_tasks
        .map { item -> [groupKey(item[0].id, item[0].task.count), item] }
        .groupTuple()
        .map { _key, items -> [volumeMeta(items[0][0])] + items[0].drop(1) }
}

// The records folder of a pass of connected components (or of post-processing) that labels a
// dataset: hidden inside the container of the dataset the pass writes, beside nothing a reader
// lists (<container>/.exllsm-records/<dataset>/<pass>). Its parent is created here: the tasks bind it.
def recordsFolder(String n5, String dataset, String pass) {
    def name = dataset.tokenize('/').join('_') ?: 'root'
    def parent = file("${n5}/.exllsm-records/${name}")
    parent.mkdirs()
    return "${parent}/${pass}"
}

// A JSON document (a script's report) as maps and lists.
def readJson(String text) {
    return parseJsonWith(new groovy.json.JsonSlurper(), text)
}

// `parser` is untyped on purpose: the type checker knows no JsonSlurper methods.
def parseJsonWith(parser, String text) {
    return parser.parseText(text)
}
