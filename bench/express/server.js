// The peer of wagate's ingress benchmark (P1): what Twilio's documentation shows for receiving
// a webhook in Node. Express parses the form, twilio.webhook() checks X-Twilio-Signature, and
// the handler answers empty TwiML. It queues nothing, so it does less work than wagate.
'use strict';
const express = require('express');
const twilio = require('twilio');

const port = Number(process.env.PORT || 3000);
const token = process.env.TWILIO_AUTH_TOKEN;
if (!token) {
  console.error('TWILIO_AUTH_TOKEN is required');
  process.exit(2);
}

const app = express();
app.use(express.urlencoded({ extended: false }));
app.post(
  '/webhooks/twilio/whatsapp/:agent',
  twilio.webhook(token),
  (req, res) => {
    res.type('text/xml').send('<?xml version="1.0" encoding="UTF-8"?><Response></Response>');
  },
);
app.listen(port, '127.0.0.1', () => console.log(`listening on ${port}`));
