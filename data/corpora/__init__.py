"""modalign.data.corpora: builders of the built-in corpora (demo, AV-MNIST, icons) and the
speech synthesis they use; apart from the data pipeline, which never imports them."""
