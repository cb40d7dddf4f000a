"""The values the library's options accept, in a module that imports nothing heavy.

The command line checks its arguments against these, and lists them in ``--help``, before it
loads torch or scikit-learn; the modules that act on the values import them from here.
"""

# Descriptors (vggfeat.extract): global pooling, how scales are combined, the paper's scales.
POOLS = ("avg", "max")
AGGREGATES = ("mean", "stack")
DENSE_SCALES = (256, 384, 512)
CROP_SCALES = (256,)
DTYPES = ("float32", "float16")  # stored precision of an extracted output
HDF5_SUFFIXES = (".h5", ".hdf5")  # what an extracted output may be named

# How the net runs (vggfeat.models.backends) and on what (vggfeat.devices).
BACKENDS = ("auto", "eager", "winograd")
DEVICE_KINDS = ("cpu", "cuda", "mps")

# ImageNet test methods (vggfeat.evaluate).
METHODS = ("dense", "multi-crop", "dense+multi-crop", "center-crop")

# Transfer (vggfeat.transfer): classifiers, protocols, and the VOC descriptors' scales
# (Appendix B: Q = 256…768 for VOC, 256…512 for Caltech).
CLASSIFIERS = ("svm", "logreg")
PROTOCOLS = ("voc2007", "voc2012", "voc2012-action", "caltech101", "caltech256", "folder")
VOC_SCALES = (256, 384, 512, 640, 768)
