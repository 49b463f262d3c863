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

import os as _os
import platform as _platform

__version__ = "0.2.0"

# TensorFlow turns its oneDNN kernels on by default only on x86 CPUs with AVX512_VNNI/BF16 or AMX.
# Elsewhere (AMD EPYC, older Xeons) its 3D convolutions fall back to Eigen, which on this U-Net's
# 1-32-channel layers is 7-15x slower per layer, 3.4x slower end to end (measured on an AMD EPYC,
# Zen 3).  Set before any module of this package can import TensorFlow; a value the user exported
# is kept.  Other architectures keep TensorFlow's own choice.
if _platform.machine().lower() in ("x86_64", "amd64"):
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
