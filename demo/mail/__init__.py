"""Demo mail for `make demo` and the tests: everyday German messages as the IMAP server sends them.

Each `*.eml` file is one message, byte for byte (CRLF line ends; `.gitattributes` here keeps Git
from converting them), delivered in file-name order by `demo.imap_server`:

- 01 newsletter: multipart/alternative (plain + HTML), quoted-printable, List-Unsubscribe
- 02 invoice: multipart/mixed with a tiny PDF attachment, RFC 2231 file name
- 03-05 a thread: invitation, reply (In-Reply-To/References), Outlook "AW:" in ISO-8859-1
- 06 parcel notice: base64 HTML only, RFC 2047 B-encoded subject with an emoji
- 07 appointment reminder: ISO-8859-1 Q-encoded words, text/calendar attachment
- 08 club invitation: 8-bit UTF-8 body, subject folded over several encoded words
- 09 family photos: Apple Mail style multipart with a tiny JPEG
- 10 broken on purpose, for the quarantine path: garbage header line, invalid encoded words,
  unparseable Date, invalid Message-ID, wrong and missing MIME boundaries, undecodable base64
- 11 an old mail program: raw 8-bit Latin-1 headers, no MIME headers, no Date, no Message-ID
"""
