"""Files and photos: Keras weight files, photo folders and augmentation, the feature cache."""
