"""Training, evaluation and publishing for the MNIST MLP (imports the model from ``app.model``)."""
