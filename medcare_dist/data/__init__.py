"""Records to tokens: reading and checking data files, chat-template labels, the batch plan. Knows the tokenizer, not the model."""
