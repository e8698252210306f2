"""The zoo: classifier heads (`heads`: rows over frozen features, fine-tuning, selection, accuracy) and the store of
personalized heads Tina is trained on (`store`: append-only, crash safe, cached whole)."""
