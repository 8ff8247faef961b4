"""Terminal presentation: the Rich live console and its sparklines."""
