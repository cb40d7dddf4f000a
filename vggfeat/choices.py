"""The values the library's options accept, in a module that imports nothing heavy.

The command line checks its arguments against these, and lists them in ``--help``, before it
loads torch or scikit-learn; the modules that act on the values import them from here.
"""

# Descriptors (vggfeat.descriptors): global pooling, how scales are combined, the paper's scales.
POOLS = ("avg", "max")
AGGREGATES = ("mean", "stack")
DENSE_SCALES = (256, 384, 512)
CROP_SCALES = (256,)
DTYPES = ("float32", "float16")  # stored precision of an extracted output
HDF5_SUFFIXES = (".h5", ".hdf5")  # what an extracted output may be named
# An image longer than MAX_ASPECT times its short side is centre-cropped to that ratio first.
MAX_ASPECT = 4.0
# An extraction publishes its finished images at least every SHARD_IMAGES images or
# SHARD_SECONDS seconds: what a kill can cost.
SHARD_IMAGES = 256
SHARD_SECONDS = 60.0
# A folder listing or URL list is cut into units of work of this many images, by position: a
# unit's identity does not depend on how many processes share the work.
UNIT_IMAGES = 1024
# Engines that drive a store's units of work (vggfeat.engines): this process alone, or the
# actors of a Ray cluster.  A unit whose Ray worker died RAY_UNIT_TRIES times (a crash, the OOM
# killer) is reported as failed rather than tried forever.
ENGINES = ("local", "ray")
RAY_UNIT_TRIES = 3
# Same-shape forward passes gather images from a window of WINDOW_BATCHES × the batch size
# consecutive images (vggfeat.models.runner); finished images wait at most that long.
WINDOW_BATCHES = 4

# How the net runs (vggfeat.models.backends) and on what (vggfeat.devices).
BACKENDS = ("auto", "eager", "winograd")
DEVICE_KINDS = ("cpu", "cuda", "mps")

# ImageNet test methods (vggfeat.evaluate).
METHODS = ("dense", "multi-crop", "dense+multi-crop", "center-crop")

# Localisation (vggfeat.localize): protocols, the classification nets' methods, the class scores'
# default net (torchvision's VGG-16, dense at vggfeat evaluate's scales for a net of unknown S),
# and the greedy merge's threshold on the match score.
LOC_METHODS = ("center-crop", "dense")
LOC_CLASSIFIER_METHODS = ("dense", "multi-crop", "dense+multi-crop")
DEFAULT_LOC_CLASSIFIER = "torchvision@dense@256,384,512"
MERGE_THRESHOLD = 1.0

# Transfer (vggfeat.transfer): classifiers, protocols, and the VOC descriptors' scales
# (Appendix B: Q = 256…768 for VOC, 256…512 for Caltech).
CLASSIFIERS = ("svm", "logreg")
PROTOCOLS = ("voc2007", "voc2012", "voc2012-action", "caltech101", "caltech256", "folder")
VOC_SCALES = (256, 384, 512, 640, 768)

# Downloading images named by URL (vggfeat.data.urls.Fetcher): seconds a connection or a read may
# stall, retries after the first try (5xx, 429, 408, connection errors, timeouts, truncated
# bodies), the first backoff in seconds (doubled each retry, plus jitter), the largest body read,
# downloads in flight, and redirects followed.
FETCH_TIMEOUT = 10.0
FETCH_RETRIES = 3
FETCH_BACKOFF = 0.5
FETCH_MAX_BYTES = 64 << 20
FETCH_CONCURRENCY = 16
FETCH_MAX_REDIRECTS = 10
