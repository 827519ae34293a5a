"""OpenAI's Files and Batch APIs for images (issue 27): files, batch validation and the runner."""
