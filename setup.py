from setuptools import Extension, setup

# The one compiled piece: a full memory barrier for the queue hot path
# (see src/pyvirtio/_fence.c). pyvirtio.fence falls back to membarrier(2)
# when the extension could not be built.
setup(ext_modules=[Extension("pyvirtio._fence", ["src/pyvirtio/_fence.c"], optional=True)])
