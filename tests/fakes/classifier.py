"""A content classifier hook for tests: flags any text that shouts BOOM."""


def flags(text: str) -> bool:
    return "BOOM" in text
