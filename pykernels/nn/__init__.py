"""Drop-in nn.Module layers built on pykernels ops."""
