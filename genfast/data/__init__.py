"""Small built-in datasets and loaders (text, tokenizers, images), none of which downloads anything."""
