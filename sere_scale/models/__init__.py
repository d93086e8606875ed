"""Models: timm ViT backbone wrapper, projection/prediction and image-level heads, student/teacher network."""
