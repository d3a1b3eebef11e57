<?php

declare(strict_types=1);

use PerfexWebhooks\Module;
use PHPUnit\Framework\TestCase;

/** Setup → Webhooks pipeline: what the page shows, what saving stores, the test-event button. */
final class SettingsPageTest extends TestCase
{
    protected function setUp(): void
    {
        harness_start(':memory:', ['perfex_webhooks_url' => 'http://pipeline.test:6066', 'perfex_webhooks_token' => 'secret-token']);
    }

    public function testThePageShowsTheSettingsTheEventsAndTheSpool(): void
    {
        Module::instance()->spool()->push([\PerfexWebhooks\Envelope::build('lead.created', '7', ['id' => '7'])]);
        [$html, $redirect] = harness_admin('index');
        $this->assertNull($redirect);
        $this->assertStringContainsString('value="http://pipeline.test:6066"', $html);
        $this->assertStringNotContainsString('secret-token', $html, 'the token is never shown');
        $this->assertStringContainsString('1 event(s) waiting for the pipeline', $html);
        $this->assertSame(count(Module::instance()->map()['events']), substr_count($html, 'name="events[]"'));
        $this->assertGreaterThan(100, substr_count($html, 'name="events[]"'));
        $this->assertStringContainsString('value="invoice.paid"', $html);
        $this->assertStringContainsString('estimate.expired', $html); // listed as not sent, with why
    }

    public function testSavingStoresTheOptionsAndKeepsTheTokenWhenLeftEmpty(): void
    {
        [, $redirect] = harness_admin('index', [
            'url' => 'https://webhooks.example/api/events',
            'token' => '',
            'events' => ['invoice.paid', 'lead.created', 'not.an.event'],
            'timeout_ms' => '99999',
        ]);
        $this->assertSame('http://crm.test/admin/perfex_webhooks', $redirect);
        $this->assertSame('https://webhooks.example/api/events', get_option('perfex_webhooks_url'));
        $this->assertSame('secret-token', get_option('perfex_webhooks_token'));
        $this->assertSame('["invoice.paid","lead.created"]', get_option('perfex_webhooks_events'));
        $this->assertSame('10000', get_option('perfex_webhooks_timeout_ms'));
        $this->assertTrue(Module::instance()->enabled('invoice.paid'));
        $this->assertFalse(Module::instance()->enabled('invoice.created'));

        harness_admin('index', ['url' => 'ftp://nope', 'token' => '']);
        $this->assertSame('danger', $GLOBALS['harness']['alerts'][0][0]);
        $this->assertSame('https://webhooks.example/api/events', get_option('perfex_webhooks_url'));
    }

    public function testTheTestEventButtonSaysWhenThePipelineCannotBeReached(): void
    {
        update_option('perfex_webhooks_url', 'http://127.0.0.1:9/api/events');
        Module::instance()->reset();
        harness_admin('test_event', ['event' => 'invoice.paid']);
        [$type, $message] = $GLOBALS['harness']['alerts'][0];
        $this->assertSame('danger', $type);
        $this->assertStringContainsString('unreachable', $message);
        $this->assertSame(0, Module::instance()->spool()->size(), 'a test event is never spooled');
    }

    public function testActivationCanRunAgainAndUninstallRemovesEverything(): void
    {
        Module::instance()->spool()->push([\PerfexWebhooks\Envelope::build('lead.created', '7', ['id' => '7'])]);
        ($GLOBALS['harness']['activation']['perfex_webhooks'])(); // upgrade: activate again
        $this->assertSame(1, Module::instance()->spool()->size(), 'the spool survives an upgrade');
        $this->assertSame('secret-token', get_option('perfex_webhooks_token'), 'settings survive an upgrade');

        harness_uninstall();
        $tables = get_instance()->db->pdo->query("SELECT name FROM sqlite_master WHERE name LIKE 'tblperfex_webhooks%'")->fetchAll();
        $this->assertSame([], $tables);
        $this->assertSame('', get_option('perfex_webhooks_url'));
    }
}
