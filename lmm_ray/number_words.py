"""The number words every module agrees on (one home: tokenizer, answer parsing, probe).

COUNT_WORDS are the words a count answer may use (zero..twenty, the range of the study's
`parse_count`); NUMBER_WORDS add the tens and magnitudes the counting-bias probe treats as number
tokens (docs/architecture.md, "Metrics").
"""

COUNT_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
NUMBER_WORDS = COUNT_WORDS + (
    "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million", "billion",
)
