"""Build hook: compiles native/ (cffi API mode) at install time, `pip install -e .` included."""

from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
