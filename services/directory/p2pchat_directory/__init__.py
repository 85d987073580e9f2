"""The p2pchat directory: users, contacts, sessions, presence and the certificate authority."""
