"""Drop-in optimizers with ``torch.optim``'s hyperparameters, state keys and state_dict."""
