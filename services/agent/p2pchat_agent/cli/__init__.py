"""`p2pchat`: the terminal client that drives one agent over its control socket."""
