"""ExLLSM neuron segmentation: a 3D U-Net library for expansion + lattice light-sheet volumes.

Modules:

* :mod:`.volume` - N5 / zarr v2 datasets in x,y,z order (read with reflect borders, chunked writes);
* :mod:`.geometry` - blocks, the global tile grid, the scaling-factor tiling;
* :mod:`.unet` - the Keras 3 U-Net, legacy ``.h5`` weights, tile inference;
* :mod:`.scaling` - the log-histogram intensity scaling factor;
* :mod:`.postprocess` - hysteresis and small-object removal;
* :mod:`.segment` - block-wise segmentation;
* :mod:`.codecs` - ISA-L gzip/zlib for N5 chunks;
* :mod:`.synthetic` - synthetic test volumes;
* :mod:`.training_data` - training regions, examples and the training dataset file;
* :mod:`.training` - loss, augmentation, the tf.data pipeline and the training loop;
* :mod:`.metrics` - voxel and object-level evaluation.

TensorFlow is imported only when a model is built.
"""

__version__ = "0.2.0"
