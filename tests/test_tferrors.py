from kiqa.tferrors import clean_tf_message, without_python_preamble

GRAPH_ERROR = (
    "Graph execution error:\n\nDetected at node DecodeJpeg defined at (most recent call last):\n"
    "<stack traces unavailable>\n{{function_node __inference_f_12}} Invalid JPEG data or crop window."
    "\n\t [[{{node DecodeJpeg}}]] [Op:__inference_f_12]"
)
ASSERTION = (
    "assertion failed: [image_bytes[2]: not an image (first bytes 6b697161)]\n\t [[{{node Assert}}]]"
)


def test_clean_tf_message_keeps_the_ops_own_words():
    assert clean_tf_message(GRAPH_ERROR) == "Invalid JPEG data or crop window."
    assert clean_tf_message("Invalid PNG data, size 5 [Op:DecodePng] name: ") == "Invalid PNG data, size 5"


def test_clean_tf_message_keeps_kiqas_assertion_text():
    assert clean_tf_message(ASSERTION) == "image_bytes[2]: not an image (first bytes 6b697161)"


def test_clean_tf_message_falls_back_on_an_empty_message():
    assert clean_tf_message("Graph execution error:\n\n", fallback="InvalidArgumentError") == "InvalidArgumentError"


def test_without_python_preamble_keeps_what_tf_serving_would_send():
    text = without_python_preamble(GRAPH_ERROR)
    assert text.startswith("{{function_node __inference_f_12}} Invalid JPEG data")
    assert "[[{{node DecodeJpeg}}]]" in text
    assert "Graph execution error" not in text and "Detected at node" not in text
